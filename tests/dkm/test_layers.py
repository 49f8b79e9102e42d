"""Gram layers: propagation rule, KL, NNGP initialisation."""

import torch
from dkm_helpers import toy_regression

from pyro_dkm.dkm import DeepKernelMachine, GramBlocks, GramLayer, propagate_gram
from pyro_dkm.kernels import ReluGram
from pyro_dkm.linalg import kl_zero_mean_gaussians_taylor


def _random_pd(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    return A @ A.mT / n + 0.5 * torch.eye(n, dtype=dtype)


def test_propagation_matches_explicit_inverse_formula():
    # Expected values: the docs/dkm.md formulas with an explicit matrix inverse.
    M, T = 6, 9
    Kfull = _random_pd(M + T, 0)
    K = GramBlocks(Kfull[:M, :M], Kfull[M:, :M], Kfull.diagonal()[M:])
    G_ii = _random_pd(M, 1)
    G = propagate_gram(K, torch.linalg.cholesky(G_ii))
    Kinv = torch.linalg.inv(K.ii)
    G_ti = K.ti @ Kinv @ G_ii
    g_t = (K.t_diag - (K.ti @ Kinv @ K.ti.mT).diagonal()
           + (K.ti @ Kinv @ G_ii @ Kinv @ K.ti.mT).diagonal())
    torch.testing.assert_close(G.ii, G_ii, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G.ti, G_ti, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(G.t_diag, g_t, rtol=1e-10, atol=1e-10)


def test_propagation_at_inducing_points_reproduces_learned_gram():
    # t = inducing points: G_ti = K K^-1 G = G and g_t = diag(G) (exact identity).
    M = 7
    K_ii = _random_pd(M, 2)
    G_ii = _random_pd(M, 3)
    G = propagate_gram(GramBlocks(K_ii, K_ii, K_ii.diagonal()), torch.linalg.cholesky(G_ii))
    torch.testing.assert_close(G.ti, G_ii, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(G.t_diag, G_ii.diagonal(), rtol=1e-9, atol=1e-9)


def test_propagated_diagonal_clamped_not_negative_under_cancellation():
    # k_tt slightly below the Nystrom term (what float32 cancellation produces): the
    # residual must be clamped at 0, so g_t = ||B^T A||^2 >= 0 exactly.
    M = 5
    K_ii = _random_pd(M, 4)
    k_it = K_ii[:, :2]  # test points = first two inducing points
    k_tt = K_ii.diagonal()[:2] * (1 - 1e-6)
    G_ii = 1e-8 * torch.eye(M, dtype=torch.float64)
    G = propagate_gram(GramBlocks(K_ii, k_it.mT, k_tt), torch.linalg.cholesky(G_ii))
    assert (G.t_diag >= 0).all()
    # expected: residual clamped to 0, plus diag(G_ii) at the inducing points = 1e-8
    torch.testing.assert_close(G.t_diag, torch.full((2,), 1e-8, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_layer_kl_exact_and_taylor():
    # exact KL vs torch.distributions' MVN KL; Taylor vs pyro_dkm.linalg's.
    M = 6
    K_ii = _random_pd(M, 5)
    G_ii = _random_pd(M, 6)
    K = GramBlocks(K_ii, K_ii[:2], K_ii.diagonal()[:2])
    layer = GramLayer(M, nu=0.3)
    layer.set_gram(G_ii)
    _, kl = layer(K)
    zero = torch.zeros(M, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(zero, G_ii),
        torch.distributions.MultivariateNormal(zero, K_ii))
    torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
    taylor = GramLayer(M, nu=0.3, kl="taylor")
    taylor.set_gram(G_ii)
    _, kl_t = taylor(K)
    torch.testing.assert_close(kl_t, kl_zero_mean_gaussians_taylor(G_ii, K_ii), rtol=1e-10,
                               atol=1e-12)


def test_initialisation_is_the_nngp():
    # At construction every learned inducing Gram equals the kernel of the previous one
    # (the NNGP chain K(K(X X^T/d))), so every KL is 0.
    X, _ = toy_regression(12)
    Z = X[:8]
    m = DeepKernelMachine(Z, depth=3, nu=1.0)
    G = Z @ Z.mT / Z.shape[1]
    for layer in m.gram_layers:
        G = ReluGram()(G)
        torch.testing.assert_close(layer.inducing_gram, G, rtol=1e-10, atol=1e-12)
    _, _, kls = m.forward_blocks(X)
    for kl in kls:
        assert abs(float(kl.detach())) < 1e-8


def test_whitened_layer_kl_and_gram():
    # whitened: G = L_K V V^T L_K^T; its closed-form KL equals the general KL of
    # pyro_dkm.linalg (1e-10), and set_gram/factor round-trip a given Gram.
    from pyro_dkm.linalg import kl_zero_mean_gaussians

    M = 6
    K_ii = _random_pd(M, 7)
    G_ii = _random_pd(M, 8)
    L_K = torch.linalg.cholesky(K_ii)
    layer = GramLayer(M, nu=1.0, parameterisation="whitened")
    layer.set_gram(G_ii, K_tril=L_K)
    G_tril = layer.factor(L_K)
    torch.testing.assert_close(G_tril @ G_tril.mT, G_ii, rtol=1e-10, atol=1e-12)
    K = GramBlocks(K_ii, K_ii[:3], K_ii.diagonal()[:3])
    _, kl = layer(K)
    torch.testing.assert_close(kl, kl_zero_mean_gaussians(G_ii, K_ii), rtol=1e-10, atol=1e-12)
    layer.reset_to_prior(K_ii)
    _, kl0 = layer(K)
    assert abs(float(kl0.detach())) < 1e-12


def test_whitened_and_cholesky_models_agree():
    # Same Grams in both parameterisations -> same objective and predictions (1e-9).
    import pyro
    from dkm_helpers import perturb_grams

    X, y = toy_regression(25)
    Z = X[:9]
    w = DeepKernelMachine(Z, depth=2, nu=[0.5, 2.0], gram_parameterisation="whitened")
    perturb_grams(w, 0.2)
    w.init_q(X, y)
    c = DeepKernelMachine(Z, depth=2, nu=[0.5, 2.0])
    with torch.no_grad():
        G = w.input_layer(Z)
        for kern, lw, lc in zip(w.kernel_layers, w.gram_layers, c.gram_layers):
            K = kern(G)
            L_K = torch.linalg.cholesky(K.ii)
            lc.set_gram(G_tril=lw.factor(L_K))
            G, _ = lw(K)
    c.output.load_state_dict(w.output.state_dict())
    pyro.clear_param_store()
    a, b = w.objective(X, y).item(), c.objective(X, y).item()
    assert abs(a - b) < 1e-9 * abs(a), (a, b)
    torch.testing.assert_close(w.predict(X[:5]).loc, c.predict(X[:5]).loc, rtol=1e-9,
                               atol=1e-10)


def test_input_ard_equals_rescaled_inputs():
    # input_ard with lengthscales l is the plain DKM on inputs X / l (and inducing
    # inputs Z / l): same objective (1e-10 relative) and predictions
    from pyro_dkm.dkm import select_inducing_points

    X, y = toy_regression(30)
    Z = select_inducing_points(X, 8)
    ell = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)
    ard = DeepKernelMachine(Z, input_ard=True)
    with torch.no_grad():
        ard.input_layer.input_lengthscale_unconstrained.copy_(ell.log())
    ard.reset_to_nngp()
    ard.init_q(X, y)
    plain = DeepKernelMachine(Z / ell)
    plain.init_q(X / ell, y)
    a, b = ard.objective(X, y).item(), plain.objective(X / ell, y).item()
    assert abs(a - b) < 1e-10 * abs(b), (a, b)
    torch.testing.assert_close(ard.predict(X[:5]).loc, plain.predict(X[:5] / ell).loc,
                               rtol=1e-10, atol=1e-12)
    # the lengthscales are trained: they get a gradient
    g = torch.autograd.grad(ard.objective(X, y),
                            ard.input_layer.input_lengthscale_unconstrained)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0

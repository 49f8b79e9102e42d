"""Exact DKM: NNGP limit, stationarity at the optimum, Pyro ELBO."""

import pyro
import pyro.infer
import torch
from dkm_helpers import perturb_grams, relu_nngp, toy_regression

from pyro_dkm.dkm import ExactDeepKernelMachine, fit, fit_lbfgs


def _nngp_regression(X, y, Xt, noise, depth):
    k = relu_nngp(depth)
    K = k(X) + noise * torch.eye(X.shape[0], dtype=X.dtype)
    Kt = k(Xt, X)
    mean = Kt @ torch.linalg.solve(K, y)
    var = k(Xt, diag=True) - (Kt * torch.linalg.solve(K, Kt.mT).mT).sum(-1) + noise
    return mean, var


def _lbfgs(model, iters=200, grams_only=False, rounds=3):
    fit_lbfgs(model, max_iter=iters, grams_only=grams_only, rounds=rounds,
              tolerance_grad=1e-12)
    return model


def test_initial_exact_dkm_is_nngp_regression():
    # At the NNGP initialisation the test-point propagation gives the NNGP kernel between
    # test and training points, so predictions equal NNGP GP regression (independent
    # input-space implementation, pyro_dkm.kernels.nngp). 1e-8.
    X, y = toy_regression(20)
    Xt, _ = toy_regression(7, seed=4)
    m = ExactDeepKernelMachine(X, y, depth=2, nu=1.0, noise=0.1, standardise=False)
    mean, var = _nngp_regression(X, y, Xt, 0.1, depth=2)
    p = m.predict(Xt)
    torch.testing.assert_close(p.loc, mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(p.variance, var, rtol=1e-8, atol=1e-9)


def test_large_nu_optimum_is_the_nngp():
    # Maximise the exact objective over the Grams (noise fixed). For large nu the learned Grams stay
    # at the NNGP Grams up to O(1/nu): the deviation shrinks ~100x from nu=1e2 to 1e4, and
    # at nu=1e4 predictions equal NNGP regression to 1e-3.
    X, y = toy_regression(12)
    Xt, _ = toy_regression(6, seed=4)
    devs = {}
    for nu in (1e2, 1e4):
        pyro.clear_param_store()
        m = _lbfgs(ExactDeepKernelMachine(X, y, depth=1, nu=nu, noise=0.1, standardise=False),
                   iters=100, grams_only=True, rounds=2)
        G = m.gram_layers[0].inducing_gram.detach()
        K = relu_nngp(0)(X)
        devs[nu] = float((G - K).norm() / K.norm())
    ratio = devs[1e2] / devs[1e4]
    assert 30 < ratio < 300, devs
    assert devs[1e4] < 1e-3, devs
    noise = float(m.noise.detach())
    mean, var = _nngp_regression(X, y, Xt, noise, depth=1)
    p = m.predict(Xt)
    torch.testing.assert_close(p.loc, mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(p.variance, var, rtol=1e-3, atol=1e-3)


def test_gradient_vanishes_at_converged_optimum_and_stationarity_holds():
    # After LBFGS on the Grams (noise fixed) converges, the gradient is ~0: 1e-4 of its
    # norm at the start. Independent check in Gram space: at the optimum of the top learned
    # layer d log P(y|G)/dG = nu dKL/dG = nu/2 (K^-1 - G^-1), to 1e-3.
    X, y = toy_regression(12)
    nu = 0.5
    m = ExactDeepKernelMachine(X, y, depth=1, nu=nu, noise=0.1, standardise=False)
    params = [p for n, p in m.named_parameters() if "gram" in n]

    def gnorm():
        grads = torch.autograd.grad(-m.objective(), params)
        return float(torch.cat([g.flatten() for g in grads]).norm())

    g0 = gnorm()
    _lbfgs(m, iters=300, grams_only=True)
    assert gnorm() < 1e-4 * g0, (gnorm(), g0)
    # Gram-space stationarity
    G = m.gram_layers[0].inducing_gram.detach().requires_grad_(True)
    K_top = m.kernel_layers[-1].kernel()(G)
    n = X.shape[0]
    L = torch.linalg.cholesky(K_top + m.noise.detach() * torch.eye(n, dtype=X.dtype))
    logp = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=X.dtype),
                                                  scale_tril=L).log_prob(y)
    (dlogp,) = torch.autograd.grad(logp, G)
    dlogp = 0.5 * (dlogp + dlogp.mT)
    K_prev = m.kernel_layers[0].kernel()(X @ X.mT / X.shape[1])
    rhs = 0.5 * nu * (torch.linalg.inv(K_prev) - torch.linalg.inv(G.detach()))
    torch.testing.assert_close(dlogp, rhs, rtol=1e-3, atol=1e-3 * float(rhs.abs().max()))


def test_pyro_loss_equals_exact_objective():
    X, y = toy_regression(15)
    m = ExactDeepKernelMachine(X, y, depth=2, nu=[0.3, 3.0])
    perturb_grams(m, 0.2)
    loss = pyro.infer.Trace_ELBO().loss(m.model, m.guide)
    obj = m.objective().item()
    assert abs(-loss - obj) < 1e-10 * abs(obj)


def test_depth_zero_ard_sqexp_exact_dkm_is_an_ard_rbf_gp():
    # input_ard=True, output_variance=True, depth 0, kernel "sqexp": the ARD
    # squared-exponential GP with a marginalised constant mean,
    # K = s2 exp(-|(x - x') / l|^2 / (2 d ls^2)) + b. The objective equals the closed-form
    # log marginal likelihood and predict the GP posterior (1e-10), at hyper-parameters
    # moved away from their initial values; every new parameter gets a nonzero gradient.
    g = torch.Generator().manual_seed(3)
    X = torch.randn(25, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(25, generator=g, dtype=torch.float64)
    Xt = torch.randn(7, 3, generator=g, dtype=torch.float64)
    m = ExactDeepKernelMachine(X, y, depth=0, kernel="sqexp", input_ard=True, noise=0.05,
                               standardise=False, lengthscale=0.7, output_variance=True)
    ell = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64)
    m.input_layer.input_lengthscale = ell
    m.output_variance = torch.tensor(2.3, dtype=torch.float64)
    m.output_bias = torch.tensor(0.4, dtype=torch.float64)

    def k(A, B):
        d2 = (((A[:, None] - B[None]) / ell) ** 2).sum(-1)
        return 2.3 * torch.exp(-d2 / (2 * 3 * 0.7 ** 2)) + 0.4

    K = k(X, X) + 0.05 * torch.eye(25, dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(torch.zeros(25, dtype=torch.float64),
                                                  K).log_prob(y)
    torch.testing.assert_close(m.objective().detach(), want, rtol=1e-10, atol=1e-10)
    pred = m.predict(Xt)
    Kt = k(Xt, X)
    torch.testing.assert_close(pred.mean, Kt @ torch.linalg.solve(K, y), rtol=1e-10,
                               atol=1e-10)
    var = 2.3 + 0.4 - (Kt * torch.linalg.solve(K, Kt.mT).mT).sum(-1) + 0.05
    torch.testing.assert_close(pred.variance, var, rtol=1e-10, atol=1e-10)
    m.objective().backward()
    grad = m.input_layer.input_lengthscale_unconstrained.grad
    assert grad is not None and (grad.abs() > 1e-6).all()
    assert abs(float(m.output_variance_unconstrained.grad)) > 1e-6
    assert abs(float(m.output_bias_unconstrained.grad)) > 1e-6


def test_nu_inf_exact_dkm_stays_nngp_regression_while_the_noise_trains():
    # nu = inf: the Grams are the NNGP's whatever is trained (here the noise): after Adam
    # steps the objective is the NNGP GP's log marginal likelihood and the predictions
    # NNGP GP regression, with the fitted noise (1e-8); there is no Gram parameter
    X, y = toy_regression(20)
    Xt, _ = toy_regression(7, seed=4)
    m = ExactDeepKernelMachine(X, y, depth=2, nu=float("inf"), standardise=False)
    assert [n for n, _ in m.named_parameters()] == ["noise_unconstrained"]
    fit(m, X, y, num_steps=30, lr=0.05, progress=False)
    noise = float(m.noise.detach())
    assert abs(noise - 0.1) > 1e-3  # it moved
    mean, var = _nngp_regression(X, y, Xt, noise, depth=2)
    pred = m.predict(Xt)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(pred.variance, var, rtol=1e-8, atol=1e-9)
    K = relu_nngp(2)(X) + noise * torch.eye(20, dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(torch.zeros(20, dtype=torch.float64),
                                                  K).log_prob(y)
    torch.testing.assert_close(m.objective().detach(), want, rtol=1e-8, atol=1e-8)

"""Sparse DKM: objective identities, ELBO estimates, minibatching, persistence."""

import math

import pyro
import pyro.infer
import pytest
import torch
from dkm_helpers import perturb_grams, relu_nngp, toy_regression

from pyro_dkm.dkm import DeepKernelMachine, ExactDeepKernelMachine, select_inducing_points


def _trained_like(depth=2, n=30, M=None, seed=0, **kw):
    """A sparse DKM away from its initial state: perturbed Grams, optimal-ish q(u)."""
    X, y = toy_regression(n, seed=seed)
    Z = X if M is None else select_inducing_points(X, M, seed=seed)
    m = DeepKernelMachine(Z, depth=depth, nu=[0.5, 2.0][:depth], **kw)
    perturb_grams(m, 0.2)
    if m.likelihood_name == "gaussian":
        m.init_q(X, y)
    return m, X, y


@pytest.mark.parametrize("kernel", ["relu", ["sqexp", "normalised_gaussian", "erf"]])
def test_sparse_with_inducing_set_equal_to_training_set_is_exact_dkm(kernel):
    # Z = X, same learned Grams, q(u) at its closed-form optimum: the sparse objective
    # equals the exact DKM objective (the SVGP bound is tight when Z = X). Tolerance 1e-6.
    X, y = toy_regression(25)
    exact = ExactDeepKernelMachine(X, y, depth=2, nu=[0.5, 2.0], noise=0.05, kernel=kernel,
                                   lengthscale=1.3)
    perturb_grams(exact, 0.3)
    sparse = DeepKernelMachine(X, depth=2, nu=[0.5, 2.0], noise=0.05, kernel=kernel,
                               lengthscale=1.3)
    for ls, le in zip(sparse.gram_layers, exact.gram_layers):
        ls.set_gram(G_tril=le.gram_tril.detach())
    sparse.set_target_scaling(y)  # the exact DKM standardises y by default
    sparse.init_q(X, y)
    e, s = float(exact.objective().detach()), float(sparse.objective(X, y).detach())
    assert abs(e - s) < 1e-6, (e, s)
    # and exact predictions = sparse predictions at new points
    Xt, _ = toy_regression(10, seed=5)
    pe, ps = exact.predict(Xt), sparse.predict(Xt)
    torch.testing.assert_close(ps.loc, pe.loc, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ps.scale, pe.scale, rtol=1e-6, atol=1e-7)


def test_meanfield_elbo_equals_closed_form_objective():
    # TraceMeanField_ELBO: analytic KL(q(u)||p(u)), analytic expected log-likelihood, so
    # -loss is the closed-form objective to rounding (1e-9 relative).
    m, X, y = _trained_like(M=10)
    with torch.no_grad():
        m.output.u_loc_unconstrained.add_(0.1)
    loss = pyro.infer.TraceMeanField_ELBO().loss(m.model, m.guide, X, y)
    obj = m.objective(X, y).item()
    assert abs(-loss - obj) < 1e-9 * abs(obj), (loss, obj)


@pytest.mark.parametrize("analytic", [True, False])
def test_trace_elbo_is_unbiased_monte_carlo_estimate(analytic):
    # Trace_ELBO samples u ~ q(u): its mean over draws must equal the closed-form
    # objective within 4 standard errors (SE computed from the draws).
    m, X, y = _trained_like(M=8, analytic_expectation=analytic)
    with torch.no_grad():
        m.output.u_loc_unconstrained.add_(0.2)
    obj = m.objective(X, y).item()
    elbo = pyro.infer.Trace_ELBO()
    draws = torch.tensor([-elbo.loss(m.model, m.guide, X, y) for _ in range(300)])
    se = float(draws.std()) / math.sqrt(len(draws))
    assert se > 0
    assert abs(float(draws.mean()) - obj) < 4 * se, (float(draws.mean()), obj, se)


def test_minibatch_elbo_is_unbiased_for_full_elbo():
    # plate subsampling scales a batch of B points by N/B: the mean over random batches
    # is the full-data ELBO, within 4 standard errors.
    m, X, y = _trained_like(M=8, n=40)
    full = m.objective(X, y).item()
    elbo = pyro.infer.TraceMeanField_ELBO()
    draws = torch.tensor([-elbo.loss(m.model, m.guide, X, y, subsample_size=7)
                          for _ in range(250)])
    se = float(draws.std()) / math.sqrt(len(draws))
    assert se > 0  # batches really differ
    assert abs(float(draws.mean()) - full) < 4 * se, (float(draws.mean()), full, se)
    # user-supplied minibatches (num_data): a partition of the data sums to the full ELBO
    # with the per-batch scaling undone (exact identity, 1e-9 relative).
    parts = torch.arange(40).chunk(5)
    kl_terms = m.objective(X, y).item() - m.expected_log_likelihood(
        *m.latent_marginals(X), m._check_y(y, 40)).sum().item()
    ells = []
    for idx in parts:
        obj_b = -elbo.loss(m.model, m.guide, X[idx], y[idx], num_data=40)
        ells.append((obj_b - kl_terms) * len(idx) / 40)
    assert abs(sum(ells) + kl_terms - full) < 1e-9 * abs(full)


def test_gradients_of_elbo_match_objective():
    # SVI trains what objective() computes: same gradients (1e-8 relative).
    m, X, y = _trained_like(M=8)
    elbo = pyro.infer.TraceMeanField_ELBO()
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad(elbo.differentiable_loss(m.model, m.guide, X, y), params,
                             allow_unused=True)
    g2 = torch.autograd.grad(-m.objective(X, y), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_predict_batches_agree_and_noise_flag():
    m, X, _ = _trained_like(M=8)
    Xt, _ = toy_regression(23, seed=9)
    p1 = m.predict(Xt, batch_size=5)
    p2 = m.predict(Xt)
    torch.testing.assert_close(p1.loc, p2.loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1.scale, p2.scale, rtol=1e-12, atol=1e-12)
    latent = m.predict(Xt, include_noise=False)
    torch.testing.assert_close(latent.variance + m.noise.detach(), p2.variance, rtol=1e-12,
                               atol=1e-12)
    assert p2.loc.shape == (23,)


def test_save_load_round_trips_predictions(tmp_path):
    m, X, y = _trained_like(M=8)
    Xt, _ = toy_regression(11, seed=3)
    before = m.predict(Xt)
    path = tmp_path / "dkm.pt"
    m.save(path)
    pyro.clear_param_store()
    m2 = DeepKernelMachine.load(path)
    after = m2.predict(Xt)
    assert torch.equal(before.loc, after.loc) and torch.equal(before.scale, after.scale)
    # plain state_dict into a freshly constructed model
    m3 = DeepKernelMachine(X[:8], depth=2, nu=[0.5, 2.0])
    m3.load_state_dict(m.state_dict())
    assert torch.equal(m3.predict(Xt).loc, before.loc)


def test_multi_output_and_per_channel_covariance():
    # two identical output channels with per-channel S: both channels predict the same.
    X, y = toy_regression(30)
    Y = torch.stack([y, y], -1)
    m = DeepKernelMachine(X[:10], depth=1, out_channels=2, shared_covariance=False)
    m.init_q(X, Y)
    p = m.predict(X[:4])
    assert p.loc.shape == (4, 2)
    torch.testing.assert_close(p.loc[:, 0], p.loc[:, 1], rtol=1e-10, atol=1e-12)
    loss = pyro.infer.TraceMeanField_ELBO().loss(m.model, m.guide, X, Y)
    assert abs(-loss - m.objective(X, Y).item()) < 1e-8 * abs(loss)


def test_categorical_training_learns_two_classes():
    # XOR-like labels that a linear model cannot fit; a short fit reaches > 90% training
    # accuracy (the NNGP-initialised DKM separates them easily).
    from pyro_dkm.dkm import fit
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=g, dtype=torch.float64)
    X = torch.cat([X, torch.ones(60, 1, dtype=torch.float64)], -1)  # bias feature
    labels = ((X[:, 0] * X[:, 1]) > 0).long()
    m = DeepKernelMachine(select_inducing_points(X, 15), depth=1, likelihood="categorical",
                          out_channels=2)
    fit(m, X, labels, num_steps=150, lr=0.05, progress=False, seed=0)
    pred = m.predict(X)
    assert isinstance(pred, torch.distributions.Categorical)
    probs = pred.probs
    assert probs.shape == (60, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(60, dtype=torch.float64))
    acc = float((probs.argmax(-1) == labels).double().mean())
    assert acc > 0.9, acc


def test_pyrosample_prior_on_noise_with_autoguide():
    # Hyper-parameters are PyroParams: swap noise for a prior and give it an AutoNormal
    # guide next to the DKM's q(u); the model then has a latent "noise" site.
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoCallable, AutoGuideList, AutoNormal
    from pyro.nn import PyroSample

    X, y = toy_regression(20)
    m = DeepKernelMachine(X[:6], depth=1)
    m.noise = PyroSample(dist.LogNormal(torch.tensor(-2.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64)))
    guide = AutoGuideList(m.model)
    guide.append(AutoNormal(pyro.poutine.block(m.model, expose=["likelihood.variance"])))
    guide.append(AutoCallable(m.model, m.guide))
    svi = pyro.infer.SVI(m.model, guide, pyro.optim.Adam({"lr": 0.01}),
                         pyro.infer.Trace_ELBO())
    losses = [svi.step(X, y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    tr = pyro.poutine.trace(m.model).get_trace(X, y)
    site = tr.nodes["likelihood.variance"]  # the noise is the likelihood's variance
    assert site["type"] == "sample" and not site["is_observed"]


def test_kernel_lengthscale_is_a_learned_pyroparam():
    # named kernels with a lengthscale register it as a PyroParam that SVI updates
    X, y = toy_regression(30)
    m = DeepKernelMachine(X[:8], depth=1, kernel="sqexp", lengthscale=2.0)
    tr = pyro.poutine.trace(m.model).get_trace(X, y)
    assert "kernel_layers.0.lengthscale" in tr.nodes
    svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.05}),
                         pyro.infer.TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(X, y)
    assert float(m.kernel_layers[0].lengthscale.detach()) != 2.0


@pytest.mark.parametrize("shared", [True, False])
def test_kl_to_prior_equals_torch_kl_divergence(shared):
    # closed-form sum_c KL(q(u_c) || N(0, K_ii)) = torch.distributions.kl_divergence (1e-10)
    X, _ = toy_regression(20)
    m = DeepKernelMachine(select_inducing_points(X, 8), out_channels=2,
                          shared_covariance=shared)
    perturb_grams(m, 0.2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # q(u) away from the prior: random mean, random scale factor
        m.output.u_loc_unconstrained.normal_(0, 0.3, generator=gen)
        S = m.output.u_scale_tril_unconstrained
        S.add_(0.1 * torch.randn(S.shape, generator=gen, dtype=S.dtype).tril())
    K, K_tril, _ = m.forward_blocks(X)
    q, p = m.output.posterior(), m.output.prior(K_tril)
    ref = torch.distributions.kl_divergence(q.base_dist, p.base_dist).sum()
    torch.testing.assert_close(m.output.kl_to_prior(K_tril), ref, rtol=1e-10, atol=1e-10)


def test_minibatch_objective_equals_meanfield_elbo_and_its_gradients():
    # objective(X_b, y_b, num_data=N) = -TraceMeanField_ELBO on the same minibatch (1e-9
    # relative), with the same gradients (1e-8): what fit's closed-form path computes
    m, X, y = _trained_like(n=40, M=8)
    idx = torch.arange(5, 17)
    elbo = pyro.infer.TraceMeanField_ELBO()
    params = list(m.parameters())
    loss = elbo.differentiable_loss(m.model, m.guide, X[idx], y[idx], num_data=40)
    obj = m.objective(X[idx], y[idx], num_data=40)
    assert abs(loss.item() + obj.item()) < 1e-9 * abs(obj.item())
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    g2 = torch.autograd.grad(-obj, params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="num_data"):
        m.objective(X[idx], y[idx], num_data=3)


def test_fit_closed_form_path_matches_pyro_path():
    # fit's closed-form loss and the traced Pyro ELBO give the same training run (full
    # batch, so no dependence on the random minibatch order): same losses to 1e-9
    from pyro_dkm.dkm import fit

    runs = []
    for closed in (True, False):
        m, X, y = _trained_like(n=30, M=6)
        res = fit(m, X, y, num_steps=5, lr=1e-2, progress=False, closed_form_loss=closed)
        runs.append(res.losses)
    for a, b in zip(*runs):
        assert abs(a - b) < 1e-9 * abs(b), runs


def test_nu_inf_keeps_the_nngp_through_fit():
    # nu = inf holds every Gram at its prior through pyro_dkm's fit (inducing inputs, q(u)
    # and the noise train): the top-layer kernel blocks stay the input-space NNGP of the
    # moved inducing inputs (1e-10), and no Gram is a parameter. (Freezing a whitened
    # V = I by requires_grad_(False), the earlier recipe, does not survive: Pyro
    # re-enables gradients of a PyroModule's parameters when the model runs.)
    from pyro_dkm.dkm import fit

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    Z0 = X[:8].clone()
    m = DeepKernelMachine(Z0, depth=2, nu=math.inf)
    assert not any("gram" in n for n, _ in m.named_parameters())
    fit(m, X, y, num_steps=25, lr=0.05, progress=False)
    Z = m.input_layer.inducing_points.detach()
    assert float((Z - Z0).abs().max()) > 1e-3  # the inducing inputs moved
    k = relu_nngp(2)
    K, _, kls = m.forward_blocks(X)
    torch.testing.assert_close(K.ii.detach(), k(Z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(K.ti.detach(), k(X, Z), rtol=1e-10, atol=1e-10)
    assert all(float(kl) == 0.0 for kl in kls)

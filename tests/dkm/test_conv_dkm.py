"""Convolutional deep kernel machines: the NNGP limit, the inter-domain Gram, batch norm,
stochastic kernel regularisation, float32 training and the model contract."""

import math

import pyro
import pytest
import torch

from pyro_dkm.dkm import fit
from pyro_dkm.dkm.conv import (
    ConvGramLayer,
    ConvInput,
    ConvKernel,
    ConvMix,
    GramBatchNorm,
    GramPool,
    select_inducing_patches,
)
from pyro_dkm.dkm.conv_model import ConvDeepKernelMachine
from pyro_dkm.kernels.conv import (
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    ConvRelu,
    GlobalAvgPool,
    conv_serial,
)
from pyro_dkm.kernels.gram import ReluGram
from pyro_dkm.kernels.nngp import Dense
from pyro_dkm.likelihoods import Categorical, TemperedCategorical

D = torch.float64


def _data(N=6, C=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, L, generator=g, dtype=D)


def _model(X, P=12, **kw):
    Z = select_inducing_patches(X, P, 5, seed=1)
    args = dict(filters=(3, 3), pool=(2, 1, 1), kernel=ReluGram(1.0),
                weight_var=[1.5, 2.0, 2.0], bias_var=0.1, head_weight_var=1.3,
                head_bias_var=0.2, nu=1e3)
    args.update(kw)
    return ConvDeepKernelMachine(Z, **args)


def _nngp():
    return conv_serial(Conv1d(5, 1.5, 0.1), AvgPool1d(2), ConvRelu(), Conv1d(3, 2.0, 0.1),
                       ConvRelu(), Conv1d(3, 2.0, 0.1), ConvRelu(), GlobalAvgPool(),
                       Dense(1.3, 0.2))


def test_at_the_prior_the_conv_dkm_is_the_conv_nngp():
    """nu -> inf: every learned Gram at its prior, the data blocks are the conv NNGP's."""
    X = _data()
    m = _model(X)
    K, _, kls = m.forward_blocks(X)
    assert torch.allclose(K.t_diag, _nngp()(X, diag=True), rtol=1e-12, atol=1e-12)
    assert all(float(kl.detach().abs()) < 1e-10 for kl in kls)
    # the hidden layers' per-image Grams are the NNGP's position-by-position covariances
    s = torch.einsum("ncs,nct->nst", X, X) / X.shape[1]
    s = Conv1d(5, 1.5, 0.1).spatial(s, (8,))  # (the Gram layer comes before the pooling)
    assert torch.allclose(m.hidden_grams(X)[0].tt, s, rtol=1e-12, atol=1e-12)


def test_2d_conv_dkm_at_the_prior_is_the_2d_conv_nngp():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 2, 4, 4, generator=g, dtype=D)
    m = ConvDeepKernelMachine(select_inducing_patches(X, 10, 3), filters=(3,), pool=(2, 1),
                              kernel=ReluGram(1.0), weight_var=[1.5, 2.0], bias_var=0.1,
                              head_weight_var=1.3, head_bias_var=0.2)
    k = conv_serial(Conv2d(3, 1.5, 0.1), AvgPool2d(2), ConvRelu(), Conv2d(3, 2.0, 0.1),
                    ConvRelu(), GlobalAvgPool(), Dense(1.3, 0.2))
    K, _, _ = m.forward_blocks(X)
    assert torch.allclose(K.t_diag, k(X, diag=True), rtol=1e-12, atol=1e-12)


def _optimal_grams(X, y, nu):
    """The learned Grams at the optimum of the objective (everything else held)."""
    m = _model(X, nu=nu, out_channels=3, likelihood="gaussian")
    params = [p for gl in m.gram_layers for p in (gl.gram_tril_offdiag, gl.gram_log_diag)]
    opt = torch.optim.LBFGS(params, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -m.objective(X, y) / nu
        loss.backward()
        return loss

    opt.step(closure)
    return m.forward_blocks(X)[0]


def test_the_learned_grams_approach_the_nngp_as_one_over_nu():
    """First-order perturbation: the optimal Grams differ from the NNGP by O(1/nu)."""
    X = _data()
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    ref = _nngp()(X, diag=True)
    gaps = [float((_optimal_grams(X, y, nu).t_diag.detach() - ref).abs().max())
            for nu in (1e2, 1e3)]
    assert gaps[0] > 1e-5  # the representation does move at finite nu
    assert 7 < gaps[0] / gaps[1] < 13, gaps


def _joint_gram(ii, ti, tt, n=0):
    """The (inducing + positions of image n) Gram as one matrix."""
    top = torch.cat([ii, ti[n].mT], 1)
    bottom = torch.cat([ti[n], tt[n]], 1)
    return torch.cat([top, bottom], 0)


def test_inter_domain_blocks_form_one_psd_gram():
    """The inducing mixings are a real convolution of the joint features: the assembled
    (inducing, positions) Gram of every layer is positive semi-definite, also with random
    mixings and after a learned Gram moved off its prior."""
    X = _data()
    m = _model(X, P=10)
    with torch.no_grad():
        for layer in m.layers:
            if isinstance(layer, ConvMix):
                layer.mixing.normal_()
            if isinstance(layer, ConvGramLayer):
                layer.gram_tril_offdiag.normal_(0, 0.3)
    G = X
    for layer in m.layers:
        with torch.no_grad():
            G = layer(G)
        G = G[0] if isinstance(layer, ConvGramLayer) else G
        for n in range(X.shape[0]):
            J = _joint_gram(G.ii, G.ti, G.tt, n)
            ev = torch.linalg.eigvalsh(J)
            assert float(ev.min()) > -1e-9 * float(ev.max()), type(layer).__name__


def test_2d_convolutions_reduce_to_1d_on_a_single_row():
    """A 2-D model on (C, 1, L) images, its patches one row, is the 1-D model with the
    weight variance divided by q (the q x q taps off the row see zero padding)."""
    X = _data()
    m1 = _model(X, P=8, pool=1)
    Z1 = m1.input_layer.inducing_points.detach()
    Z2 = torch.zeros(Z1.shape[0], Z1.shape[1], 5, 5, dtype=D)
    Z2[:, :, 2, :] = Z1
    m2 = ConvDeepKernelMachine(Z2, filters=(3, 3), pool=1, kernel=ReluGram(1.0),
                               weight_var=[1.5 * 5, 2.0 * 3, 2.0 * 3], bias_var=0.1,
                               head_weight_var=1.3, head_bias_var=0.2, nu=1e3)
    with torch.no_grad():
        for a, b in zip(m1.layers, m2.layers):
            if isinstance(a, ConvMix):
                b.mixing.zero_()
                b.mixing[3:6].copy_(a.mixing)  # the middle row of the 3 x 3 taps
    m2.reset_to_nngp()
    m1.reset_to_nngp()
    K1, _, _ = m1.forward_blocks(X)
    K2, _, _ = m2.forward_blocks(X[:, :, None, :])
    for a, b in zip(K1, K2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_2d_data_blocks_match_a_wide_finite_conv_net():
    """Monte Carlo: the per-image Gram of wide random 2-D ReLU conv nets (conv 3x3, ReLU,
    2x2 average pool, conv 3x3), 16 nets of 1000 channels, is within 4 standard errors of
    ConvInput -> ReLU -> pool -> ConvMix at the prior, entry by entry."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 2, 4, 4, generator=g, dtype=D)
    width, F, ests = 1000, torch.nn.functional, []
    for s in range(16):
        gs = torch.Generator().manual_seed(100 + s)
        W1 = torch.randn(width, 2, 3, 3, generator=gs, dtype=D) * math.sqrt(1.0 / 18)
        W2 = torch.randn(width, width, 3, 3, generator=gs, dtype=D) * math.sqrt(
            2.0 / (9 * width))
        h = F.avg_pool2d(torch.relu(F.conv2d(X, W1, padding=1)), 2)
        h = F.conv2d(h, W2, padding=1).flatten(2)  # (N, width, 4)
        ests.append(h.mT @ h / width)  # (N, 4, 4)
    E = torch.stack(ests)
    se = E.std(0) / math.sqrt(len(ests))
    Z = select_inducing_patches(X, 4, 3)
    G = ConvInput(Z, 1.0, 0.0)(X)
    G = GramPool(2)(ConvKernel(ReluGram(1.0))(G))
    G = ConvMix(3, 4, ndim=2, weight_var=2.0)(G)
    assert float((se / G.tt.abs().max()).max()) < 0.03
    assert bool(((E.mean(0) - G.tt).abs() < 4 * se + 1e-12).all()), (E.mean(0) - G.tt) / se


def test_batch_norm_eval_mode_is_per_point_and_homogeneous():
    X = _data(N=8)
    m = _model(X, kernel=ReluGram(2.0), bias_var=0.0, head_bias_var=0.0, batch_norm=True,
               gram_parameterisation="whitened", out_channels=3, likelihood="categorical")
    m.train()
    m.forward_blocks(X)  # training mode: the running statistics move
    assert any(float(b.running_diag) != 1.0 for b in m.layers if isinstance(b, GramBatchNorm))
    m.eval()
    K_all, _, _ = m.forward_blocks(X)
    K_one, _, _ = m.forward_blocks(X[2:3])
    assert torch.allclose(K_all.ti[2], K_one.ti[0], rtol=1e-12)
    assert torch.allclose(K_all.t_diag[2], K_one.t_diag[0], rtol=1e-12)
    # ReLU kernels are homogeneous in each point's scale, convolutions linear (no biases)
    # and whitened Grams follow their prior's scale: batch norm (a congruence D G D) leaves
    # the head kernel's correlations and the hidden KLs unchanged
    plain = _model(X, kernel=ReluGram(2.0), bias_var=0.0, head_bias_var=0.0,
                   gram_parameterisation="whitened", out_channels=3, likelihood="categorical")
    with torch.no_grad():
        for gm, gp in zip(m.gram_layers, plain.gram_layers):
            for p in ("gram_tril_offdiag", "gram_log_diag"):
                getattr(gm, p).normal_(0, 0.1)
                getattr(gp, p).copy_(getattr(gm, p))
    Kn, _, kln = m.forward_blocks(X)
    Kp, _, klp = plain.forward_blocks(X)

    def corr(K):
        d = K.ii.diagonal()
        return K.ti / (K.t_diag[:, None] * d[None, :]).sqrt()

    assert torch.allclose(corr(Kn), corr(Kp), rtol=1e-9)
    for a, b in zip(kln, klp):
        assert torch.allclose(a, b, rtol=1e-10)
    assert not torch.allclose(Kn.t_diag, Kp.t_diag, rtol=1e-3)  # the scales did change


def test_batch_norm_training_statistics_reproduced_in_eval_mode():
    X = _data(N=8)
    m = _model(X, batch_norm=True, out_channels=3, likelihood="categorical")
    m.train()
    K_train, _, _ = m.forward_blocks(X)
    # set the running means to this batch's (momentum 1): eval mode then equals training mode
    for b in m.layers:
        if isinstance(b, GramBatchNorm):
            b.momentum = 1.0
    m.forward_blocks(X)
    m.eval()
    K_eval, _, _ = m.forward_blocks(X)
    for a, b in zip(K_train, K_eval):
        assert torch.allclose(a, b, rtol=1e-10)


def test_skr_is_off_in_eval_mode_and_unbiased_in_training():
    X = _data(N=4)
    y = torch.tensor([0, 1, 2, 1])
    kw = dict(out_channels=3, likelihood="categorical", P=6)
    plain = _model(X, **kw)
    skr = _model(X, skr_dof=30, **kw)
    skr.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for a, b in zip(plain.gram_layers, skr.gram_layers):
            a.gram_tril_offdiag.normal_(0, 0.2)
            b.gram_tril_offdiag.copy_(a.gram_tril_offdiag)
    skr.eval()
    plain.eval()
    pyro.set_rng_seed(0)
    a = plain.objective(X, y)
    pyro.set_rng_seed(0)
    b = skr.objective(X, y)
    assert torch.equal(a, b)
    # training mode: the first layer's Gram is a Wishart draw of mean G (and the
    # propagated blocks, linear in it, are unbiased too)
    layer = skr.gram_layers[0]
    layer.train()
    K = skr.input_layer(X)
    G_mean, _ = layer.eval()(K)
    layer.train()
    torch.manual_seed(0)
    draws = [layer(K)[0] for _ in range(4000)]
    for name in ("ii", "ti", "tt"):
        d = torch.stack([getattr(g, name) for g in draws])
        se = d.std(0) / math.sqrt(len(draws))
        z = (d.mean(0) - getattr(G_mean, name)) / se.clamp_min(1e-12)
        assert float(z.detach().abs().max()) < 5.0, name
        assert float(d.detach().std(0).max()) > 0  # they are draws


def test_checkpointing_gives_the_same_gradients():
    X = _data()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    grads = []
    for ck in (False, True):
        m = _model(X, out_channels=3, likelihood="categorical", checkpoint=ck)
        pyro.set_rng_seed(0)
        loss = -m.objective(X, y)
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_float32_training_for_an_epoch_has_no_nan():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 1, 16, generator=g)
    y = (X[:, 0, :8].sum(-1) > X[:, 0, 8:].sum(-1)).long()
    Z = select_inducing_patches(X, 32, 5)
    m = ConvDeepKernelMachine(Z, filters=(3,), pool=(2, 1), nu=1.0, out_channels=2,
                              skr_dof=64, kl="taylor", batch_norm=True,
                              gram_parameterisation="whitened", dtype=torch.float32)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    torch.manual_seed(0)
    for i in range(0, 256, 32):  # one epoch of minibatches
        opt.zero_grad()
        loss = -m.objective(X[i:i + 32], y[i:i + 32], num_data=256)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    assert m.predict(X).probs.dtype == torch.float32


def test_gaussian_pyro_elbo_equals_the_objective_and_fit_trains():
    X = _data(N=10)
    y = X[:, 0].mean(-1)
    m = _model(X, out_channels=1, likelihood="gaussian", nu=1.0)
    pyro.clear_param_store()
    elbo = pyro.infer.TraceMeanField_ELBO()
    loss = elbo.differentiable_loss(m.model, m.guide, X, y)
    assert torch.allclose(-loss, m.objective(X, y), rtol=1e-9)
    res = fit(m, X, y, num_steps=30, lr=1e-2, progress=False, seed=0)
    assert res.losses[-1] < res.losses[0]


def test_tempered_categorical():
    f = torch.randn(5, 4, dtype=D)
    y = torch.tensor([0, 3, 1, 2, 0])
    t = TemperedCategorical(temperature=0.5, learn=False)
    ref = torch.log_softmax(f / 0.5, -1).gather(-1, y[:, None])[:, 0]
    assert torch.allclose(t.expected_log_prob(f, torch.zeros_like(f), y), ref, rtol=1e-12)
    torch.manual_seed(0)
    a = TemperedCategorical(1.0).expected_log_prob(f, 0.3 * torch.ones_like(f), y)
    torch.manual_seed(0)
    b = Categorical().expected_log_prob(f, 0.3 * torch.ones_like(f), y)
    assert torch.allclose(a, b, rtol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        TemperedCategorical(temperature=-1.0)


def test_bad_inputs_are_named():
    X = _data()
    m = _model(X, out_channels=3, likelihood="categorical")
    with pytest.raises(ValueError, match="X must have 2 channels"):
        m.predict(torch.randn(2, 3, 8, dtype=D))
    with pytest.raises(ValueError, match="X must have 3 dimension"):
        m.predict(torch.randn(2, 8, dtype=D))
    with pytest.raises(ValueError, match="filter width"):
        select_inducing_patches(X, 4, 4)
    with pytest.raises(ValueError, match="GramPool"):
        _model(_data(L=7), pool=(2, 1, 1)).forward_blocks(_data(L=7))
    with pytest.raises(ValueError, match="spatial_shape"):
        _model(X, readout="flatten")


def test_nu_inf_is_the_conv_nngp_kernel_machine_after_training():
    """nu = inf holds every Gram at its prior, however the rest trains: after Adam steps
    (inducing patches, mixings, q(u) and the temperature move) the data blocks are still
    the conv NNGP kernel (1e-12), the objective has no KL, no Gram is a parameter, and
    the model is the finite-nu model with its Grams frozen at the prior (the same
    objective to 1e-12 at the same parameters)."""
    X = _data()
    y = torch.arange(6) % 3
    m = _model(X, nu=math.inf, out_channels=3, likelihood=TemperedCategorical())
    names = [n for n, _ in m.named_parameters()]
    assert not any("gram_" in n for n in names) and names
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (-m.objective(X, y)).backward()
        opt.step()
    K, _, kls = m.forward_blocks(X)
    assert torch.allclose(K.t_diag, _nngp()(X, diag=True), rtol=1e-12, atol=1e-12)
    assert all(float(kl) == 0.0 for kl in kls)
    finite = _model(X, nu=10.0, out_channels=3, likelihood=TemperedCategorical(),
                    gram_parameterisation="whitened")
    finite.load_state_dict(m.state_dict())  # Grams at V = I: the prior, KL = 0
    torch.manual_seed(0)
    a = m.objective(X, y)
    torch.manual_seed(0)
    b = finite.objective(X, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="nu must be positive"):
        _model(X, nu=float("nan"))
    with pytest.raises(ValueError, match="held at its prior"):
        m.gram_layers[0].set_gram(torch.eye(12, dtype=D))

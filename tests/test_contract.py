"""The package-wide contracts: one fit, one result type, predict -> Distribution, settings."""

import pytest
import torch

import pyro_dkm
from pyro_dkm import FitResult, fit, settings

F64 = torch.float64


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=F64)
    return X, torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=F64)


def test_one_fit_for_every_model_returns_a_fit_result_and_predict_a_distribution():
    X, y = _data()
    labels = (X[:, 0] > 0).long()
    from pyro_dkm.processes import SVGPClassifier

    models = [
        (pyro_dkm.DeepKernelMachine(X[:8], depth=1), (X, y), dict(steps=5)),
        (pyro_dkm.ExactDeepKernelMachine(X[:15], y[:15], depth=1), (), dict(steps=3)),
        (pyro_dkm.GaussianProcessRegression(X, y), (), dict(steps=3)),
        (pyro_dkm.StudentTProcessRegression(X, y), (), dict(steps=3, optimizer="lbfgs")),
        (pyro_dkm.RobustRegression(X, y), (), dict(steps=3)),
        (SVGPClassifier(X[:8], num_classes=2), (X, labels), dict(steps=3, progress=False)),
    ]
    for model, data, kw in models:
        kw.setdefault("progress", False) if isinstance(
            model, (pyro_dkm.DeepKernelMachine, pyro_dkm.ExactDeepKernelMachine)) else None
        res = fit(model, *data, **kw)
        assert isinstance(res, FitResult), type(model)
        assert res.steps >= 1 and res.seconds > 0
        pred = model.predict(X[:5])
        assert isinstance(pred, torch.distributions.Distribution), type(model)


def test_fit_rejects_bad_steps_and_options_a_model_cannot_honour():
    X, y = _data()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fit(pyro_dkm.DeepKernelMachine(X[:5], depth=1), X, y, steps=-5)
    with pytest.raises(ValueError, match="does not support the option"):
        fit(pyro_dkm.GaussianProcessRegression(X, y), patience=3)
    with pytest.raises(TypeError, match="does not know how to fit"):
        fit(object())


def test_settings_context_manager_restores_and_reaches_the_solvers():
    from pyro_dkm.kernels import Dense, Relu, serial
    from pyro_dkm.kernels.keops import NNGPOperator
    from pyro_dkm.kernels.solvers import cg_solve

    assert settings.cg_tol == 1e-6 and settings.use_keops == "auto"
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(1.0, 0.0))
    X, y = _data(60)
    op = NNGPOperator(kfn, X, noise=0.1, use_keops=False)
    info_loose, info_tight = {}, {}
    with settings(cg_tol=1e-2):
        assert settings.cg_tol == 1e-2
        cg_solve(op, y, info=info_loose)
    assert settings.cg_tol == 1e-6
    cg_solve(op, y, info=info_tight)
    assert info_loose["residual"] <= 1e-2 < 1e-6 * 1e5
    assert info_tight["residual"] <= 1e-6
    assert info_loose["iterations"] < info_tight["iterations"]
    with pytest.raises(ValueError, match="use_keops must be True, False or 'auto'"):
        settings(use_keops="yes")
    with pytest.raises(ValueError, match="unknown pyro_dkm setting"):
        settings.set(jiter=1.0)


def test_settings_lazy_kernels_switch_nngp_kernel_to_the_lazy_operator():
    from pyro_dkm.gpytorch import NNGPKernel
    from pyro_dkm.kernels.keops import NNGPOperator

    X, _ = _data(30)
    k = NNGPKernel(depth=1).double()
    dense = k.forward(X, X)
    assert isinstance(dense, torch.Tensor)
    with settings(lazy_kernels=True, use_keops=False):
        lazy = k.forward(X, X)
        assert isinstance(lazy, NNGPOperator)
        torch.testing.assert_close(lazy.to_dense(), dense, rtol=1e-12, atol=1e-12)


def test_top_level_exports():
    for name in ("DeepKernelMachine", "StudentTProcessRegression", "FunctionalTucker",
                 "RobustRegression", "fit", "serial", "likelihoods", "gpytorch", "datasets",
                 "DeepKernelMachineGP"):
        assert getattr(pyro_dkm, name) is not None

"""Every model saves and loads (docs/architecture.md, "Saving and loading"): the reloaded
model predicts exactly what the saved one did."""

import pyro
import torch

import pyro_dkm
from pyro_dkm.processes import SVGPClassifier

F64 = torch.float64


def _data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=F64)
    return X, torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=F64)


def _same(a, b):
    if isinstance(a, torch.distributions.Categorical):
        torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)


def test_state_dict_round_trip_for_the_pyro_modules(tmp_path):
    X, y = _data()
    labels = (X[:, 0] > 0).long()
    builders = [
        lambda: pyro_dkm.DeepKernelMachine(X[:6].clone(), depth=1),
        lambda: pyro_dkm.GaussianProcessRegression(X, y),
        lambda: pyro_dkm.StudentTProcessRegression(X, y),
        lambda: pyro_dkm.RobustRegression(X, y),
        lambda: SVGPClassifier(X[:6].clone(), 2),
    ]
    fits = [dict(X=X, y=y, steps=20), dict(steps=5), dict(steps=5), dict(steps=3),
            dict(X=X, y=labels, steps=5)]
    for build, kw in zip(builders, fits):
        pyro.clear_param_store()
        model = build()
        data = [d for d in (kw.pop("X", None), kw.pop("y", None)) if d is not None]
        if data:
            pyro_dkm.fit(model, *data, progress=False, **kw)
        else:
            pyro_dkm.fit(model, **kw)
        torch.manual_seed(0)
        before = model.predict(X[:5])
        torch.save(model.state_dict(), tmp_path / "m.pt")
        pyro.clear_param_store()
        fresh = build()
        # RobustRegression's state_dict holds its fitted q(lam) (not only tensors)
        fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=not isinstance(
            fresh, pyro_dkm.RobustRegression)))
        torch.manual_seed(0)
        _same(fresh.predict(X[:5]), before)


def test_dkm_save_load_and_functional_tucker_pickle(tmp_path):
    X, y = _data(40)
    m = pyro_dkm.DeepKernelMachine(X[:6].clone(), depth=2, likelihood="student_t")
    pyro_dkm.fit(m, X, y, steps=10, progress=False)
    m.save(tmp_path / "dkm.pt")  # constructor arguments + state
    again = pyro_dkm.DeepKernelMachine.load(tmp_path / "dkm.pt")
    _same(again.predict(X[:5]), m.predict(X[:5]))
    g = torch.Generator().manual_seed(3)
    C = torch.linspace(0, 1, 8, dtype=F64)[torch.randint(0, 8, (100, 2), generator=g)]
    v = torch.sin(3 * C[:, 0]) * torch.cos(2 * C[:, 1])
    t = pyro_dkm.FunctionalTucker([2, 2], nu=1.5, lengthscale=1.0, progress=False, seed=0,
                                  init="random")
    t.fit(C, v)
    torch.save(t, tmp_path / "tucker.pt")  # a plain object: pickled whole
    t2 = torch.load(tmp_path / "tucker.pt", weights_only=False)
    _same(t2.predict(C[:5] + 0.03), t.predict(C[:5] + 0.03))

"""Property tests over the public entry points (hypothesis): every bad input is either a
clear ValueError/TypeError or a correct, finite answer; never a NaN, never a bare error
from deep inside torch.

Each entry point gets inputs drawn from the same catalogue of trouble: NaN / inf entries,
wrong numbers of dimensions or columns, empty and single-row inputs, duplicate rows, integer
and numpy inputs, huge magnitudes (1e8), and invalid hyper-parameters.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_dkm import (
    DeepKernelMachine,
    GaussianProcessRegression,
    StudentTProcessRegression,
    likelihoods,
    select_inducing_points,
)
from pyro_dkm.kernels import Dense, Relu, serial
from pyro_dkm.linalg import NotPositiveDefiniteError, cholesky, solve_tril

F64 = torch.float64
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
#: for the entry points with more argument combinations
FUZZ_WIDE = settings(FUZZ, max_examples=80)

#: kinds of trouble an input can have
KINDS = ["ok", "nan", "inf", "huge", "empty", "one_row", "duplicates", "int", "numpy",
         "wrong_cols", "one_dim", "three_dim"]


def make_matrix(kind: str, n: int = 8, d: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    if kind == "nan":
        X[n // 2, 0] = math.nan
    elif kind == "inf":
        X[0, -1] = math.inf
    elif kind == "huge":
        X = X * 1e8
    elif kind == "empty":
        X = X[:0]
    elif kind == "one_row":
        X = X[:1]
    elif kind == "duplicates":
        X = torch.cat([X[: n // 2], X[: n // 2]])
    elif kind == "int":
        X = (X * 3).round().long()
    elif kind == "numpy":
        X = X.numpy()
    elif kind == "wrong_cols":
        X = torch.randn(n, d + 1, generator=g, dtype=F64)
    elif kind == "one_dim":
        X = X[:, 0]
    elif kind == "three_dim":
        X = X[None]
    return X


#: outcomes seen in this session (the closing note reports them)
COUNTS = {"error": 0, "finite": 0}


def outcome(fn, valid: bool = False) -> str:
    """'error' (a clear ValueError/TypeError), 'finite' (a finite answer) or a failure.
    ``valid``: every input is good, so the answer must be finite (not an error)."""
    result = _outcome(fn)
    COUNTS[result] += 1
    if valid:
        assert result == "finite", "valid inputs must give a finite answer, not an error"
    return result


def _outcome(fn) -> str:
    try:
        out = fn()
    except (ValueError, TypeError, NotPositiveDefiniteError) as err:  # ours, with the size
        # and jitters tried, is the clear error for a numerically non-PD matrix
        assert str(err), "an error must say what was expected"
        return "error"
    except Exception as err:  # anything else is a cryptic outcome
        raise AssertionError(f"cryptic {type(err).__name__}: {err}") from err
    tensors = []
    if isinstance(out, torch.Tensor):
        tensors = [out]
    elif isinstance(out, torch.distributions.Distribution):
        tensors = [out.mean, out.variance] if not isinstance(
            out, torch.distributions.Categorical) else [out.probs]
    for t in tensors:
        assert bool(torch.isfinite(t).all()), f"silently non-finite result {t}"
    return "finite"


kinds = st.sampled_from(KINDS)


@FUZZ
@given(kind=kinds, target=kinds)
def test_dkm_constructor_predict_and_objective(kind, target):
    X = make_matrix(kind)
    y = make_matrix(target, d=1)
    y = y[:, 0] if isinstance(y, torch.Tensor) and y.dim() == 2 else y

    def run():
        m = DeepKernelMachine(make_matrix("ok")[:4], depth=1)
        return m.objective(X, y) if target != "ok" else m.predict(X)

    outcome(run)


@FUZZ
@given(kind=kinds, m=st.sampled_from([0, 1, 3, 8, 9, -1, 2.5]),
       method=st.sampled_from(["kmeans", "random", "grid"]))
def test_select_inducing_points(kind, m, method):
    outcome(lambda: select_inducing_points(make_matrix(kind), m, method=method))


@FUZZ
@given(kind=kinds, target=kinds, noise=st.sampled_from([0.1, 0.0, -1.0, math.nan, 1e-300]))
def test_exact_regressions(kind, target, noise):
    y = make_matrix(target, d=1)
    y = y[:, 0] if isinstance(y, torch.Tensor) and y.dim() == 2 else y
    for cls in (GaussianProcessRegression, StudentTProcessRegression):
        outcome(lambda cls=cls: cls(make_matrix(kind), y, noise=noise).predict(
            make_matrix("ok")[:3]))


@FUZZ
@given(kind=kinds, kind2=kinds, w=st.sampled_from([2.0, 0.0, -1.0, math.nan, math.inf]))
def test_nngp_kernel_function(kind, kind2, w):
    def run():
        kfn = serial(Dense(w, 0.1), Relu(), Dense(1.0, 0.0))
        return kfn(make_matrix(kind), make_matrix(kind2, n=5))

    outcome(run)


@FUZZ
@given(kind=st.sampled_from(["ok", "nan", "nonsym", "non_pd", "empty", "int", "numpy",
                             "one_dim", "singular", "huge"]))
def test_cholesky_and_solve(kind):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(4, 4, generator=g, dtype=F64)
    A = B @ B.mT + 4 * torch.eye(4, dtype=F64)
    if kind == "nan":
        A[1, 1] = math.nan
    elif kind == "nonsym":
        A[0, 3] += 1.0
    elif kind == "non_pd":
        A = -A
    elif kind == "empty":
        A = A[:0, :0]
    elif kind == "int":
        A = A.long()
    elif kind == "numpy":
        A = A.numpy()
    elif kind == "one_dim":
        A = A[0]
    elif kind == "singular":
        A = torch.zeros(4, 4, dtype=F64)
    elif kind == "huge":
        A = A * 1e150

    def run():
        L = cholesky(A)
        return solve_tril(L, torch.ones(L.shape[-1], 1, dtype=L.dtype))

    outcome(run)


@FUZZ
@given(name=st.sampled_from(["gaussian", "student_t", "bernoulli", "poisson"]),
       kind=st.sampled_from(["ok", "nan", "negative", "fraction", "int", "wrong_len"]))
def test_likelihood_targets(name, kind):
    lik = likelihoods.as_likelihood(name)
    m = torch.zeros(5, dtype=F64)
    v = torch.ones(5, dtype=F64)
    y = {"ok": torch.tensor([0.0, 1, 1, 0, 1], dtype=F64),
         "nan": torch.tensor([0.0, math.nan, 1, 0, 1], dtype=F64),
         "negative": -torch.ones(5, dtype=F64), "fraction": torch.full((5,), 0.5, dtype=F64),
         "int": torch.tensor([0, 1, 1, 0, 1]), "wrong_len": torch.zeros(3, dtype=F64)}[kind]
    outcome(lambda: lik.expected_log_prob(m, v, lik.check_y(y, m)))


def test_fuzz_catalogue_is_what_the_docstring_says():
    # every kind builds, and the bad ones really are bad (a fuzz test that cannot fail
    # is a defect)
    assert isinstance(make_matrix("numpy"), np.ndarray)
    assert not bool(torch.isfinite(make_matrix("nan")).all())
    assert make_matrix("empty").shape[0] == 0
    with pytest.raises(AssertionError, match="silently non-finite"):
        _outcome(lambda: torch.tensor([math.nan]))
    with pytest.raises(AssertionError, match="cryptic"):
        _outcome(lambda: torch.zeros(2) @ torch.zeros(3))


def _labels(kind: str, n: int = 8, classes: int = 3):
    """Class labels with a kind of trouble (for the classifiers)."""
    y = torch.arange(n) % classes
    return {"ok": y, "float": y.to(F64), "negative": y - 1, "too_big": y + classes,
            "wrong_len": y[:3], "two_dim": y[:, None].expand(n, 2), "numpy": y.numpy(),
            "nan": torch.full((n,), math.nan, dtype=F64), "bool": y > 0}[kind]


LABEL_KINDS = ["ok", "float", "negative", "too_big", "wrong_len", "two_dim", "numpy", "nan",
               "bool"]


@FUZZ_WIDE
@given(kind=kinds, labels=st.sampled_from(LABEL_KINDS),
       cls=st.sampled_from(["SVGPClassifier", "SVTPClassifier"]))
def test_classifiers(kind, labels, cls):
    from pyro_dkm import processes

    def run():
        model = getattr(processes, cls)(make_matrix("ok")[:4], 3)
        if labels == "ok":
            return model.predict(make_matrix(kind))
        return model.elbo(make_matrix(kind), _labels(labels))

    outcome(run, valid=kind in ("ok", "duplicates") and labels == "ok")


@FUZZ_WIDE
@given(kind=kinds, target=kinds, process=st.sampled_from(["gp", "student_t", "bogus"]),
       df=st.sampled_from([4.0, 0.0, -2.0, math.nan, math.inf]))
def test_robust_regression(kind, target, process, df):
    from pyro_dkm import RobustRegression

    y = make_matrix(target, d=1)
    y = y[:, 0] if isinstance(y, torch.Tensor) and y.dim() == 2 else y

    def run():
        model = RobustRegression(make_matrix(kind), y, process=process, df=df)
        model.fit(max_iter=3)
        return model.predict(make_matrix("ok")[:3])

    good = kind in ("ok", "huge", "duplicates") and target in ("ok", "huge", "duplicates")
    outcome(run, valid=good and process != "bogus" and 0 < df < math.inf)


def _coords(kind: str, n: int = 30, modes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = torch.randint(0, 5, (n, modes), generator=g).to(F64)
    if kind == "nan":
        C[2, 1] = math.nan
    elif kind == "inf":
        C[0, 0] = math.inf
    elif kind == "empty":
        C = C[:0]
    elif kind == "one_row":
        C = C[:1]
    elif kind == "int":
        C = C.long()
    elif kind == "numpy":
        C = C.numpy()
    elif kind == "wrong_modes":
        C = C[:, :2]
    elif kind == "one_dim":
        C = C[:, 0]
    elif kind == "huge":
        C = C * 1e8
    elif kind == "duplicates":
        C = torch.cat([C[:5]] * 6)
    return C


COORD_KINDS = ["ok", "nan", "inf", "empty", "one_row", "int", "numpy", "wrong_modes",
               "one_dim", "huge", "duplicates"]


@FUZZ_WIDE
@given(kind=st.sampled_from(COORD_KINDS), target=kinds,
       ranks=st.sampled_from([[2, 2, 2], [0, 2, 2], [2, 2], [2.5, 2, 2], [-1, 1, 1]]),
       nu=st.sampled_from([1.5, 0.5, 2.5, 1.0, -1.0]))
def test_functional_tucker(kind, target, ranks, nu):
    from pyro_dkm import FunctionalTucker

    values = make_matrix(target, n=30, d=1)
    values = values[:, 0] if isinstance(values, torch.Tensor) and values.dim() == 2 else values

    def run():
        model = FunctionalTucker(ranks, nu=nu, max_iter=3, progress=False)
        model.fit(_coords(kind), values)
        return model.predict(_coords("ok", n=4, seed=1))

    good = kind in ("ok", "int", "duplicates") and target in ("ok", "huge", "duplicates")
    outcome(run, valid=good and ranks == [2, 2, 2] and nu in (0.5, 1.5, 2.5))


@FUZZ_WIDE
@given(kind=kinds, kind2=kinds, diag=st.booleans())
def test_gpytorch_adapters(kind, kind2, diag):
    from pyro_dkm.gpytorch import DeepKernelMachineGP, GPyTorchKernel

    def run_kernel():
        k = GPyTorchKernel(serial(Dense(2.0, 0.1), Relu(), Dense(1.0, 0.0)))
        out = k(make_matrix(kind), make_matrix(kind2, n=5), diag=diag)
        return out if isinstance(out, torch.Tensor) else out.to_dense()

    def run_gp():
        gp = DeepKernelMachineGP(make_matrix("ok")[:4], num_data=8, depth=1)
        return gp(make_matrix(kind))

    good = ("ok", "huge", "duplicates", "one_row")
    outcome(run_kernel, valid=kind in good and kind2 in good)
    outcome(run_gp, valid=kind in good)

"""FunBaT streaming: partial_fit along a time mode, then smooth()."""

import copy

import pytest
import torch

from pyro_dkm.tucker import FunctionalTucker
from pyro_dkm.tucker.kalman import kalman_filter, rts_smoother

D = torch.float64


def _stream_data(seed=0, n=1500, days=60):
    """3 modes; the last is time (days 0..59 in steps of 0.5), values smooth in each."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (n,), generator=g).to(D)
    b = torch.randint(0, 5, (n,), generator=g).to(D)
    t = torch.randint(0, days, (n,), generator=g).to(D) * 0.5
    y = torch.sin(a / 2) * torch.cos(t / 4) + 0.5 * b / 5 * torch.sin(t / 3) + \
        0.05 * torch.randn(n, generator=g, dtype=D)
    order = torch.argsort(t, stable=True)
    return torch.stack([a, b, t], 1)[order], y[order]


def _fitted_on_first(X, y, t_cut, **kw):
    first = X[:, 2] < t_cut
    m = FunctionalTucker([2, 2, 2], max_iter=30, progress=False, lengthscale=[2.0, 2.0, 3.0],
                         **kw).fit(X[first], y[first])
    return m, ~first


@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_streaming_does_not_depend_on_how_the_stream_is_cut(core):
    # one call with every new entry = ten calls of a few days each (1e-10 after smooth)
    X, y = _stream_data()
    m, rest = _fitted_on_first(X, y, 10.0, core=core)
    one, many = copy.deepcopy(m), copy.deepcopy(m)
    one.partial_fit(X[rest], y[rest]).smooth()
    Xr, yr = X[rest], y[rest]
    cuts = torch.linspace(10.0, 30.0, 11, dtype=D)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        sel = (Xr[:, 2] >= lo) & (Xr[:, 2] < hi)
        if sel.any():
            many.partial_fit(Xr[sel], yr[sel])
    many.smooth()
    torch.testing.assert_close(many.u_mean[2], one.u_mean[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(many.u_var[2], one.u_var[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(many.predict(X).mean, one.predict(X).mean, rtol=1e-10,
                               atol=1e-10)


def test_streamed_and_smoothed_posterior_is_the_batch_smoother_of_all_messages():
    # sequential filtering continued over the new coordinates + the RTS pass = the
    # parallel-scan Kalman filter and smoother run once over the whole chain's messages
    X, y = _stream_data(seed=1)
    m, rest = _fitted_on_first(X, y, 12.0)
    m.partial_fit(X[rest], y[rest]).smooth()
    A, Q = m._AQ[2]
    filt = kalman_filter(A, Q, m._ssm[2].P_inf.expand(2, -1, -1), m.msg_lam[2], m.msg_eta[2])
    sm = rts_smoother(A, filt)
    torch.testing.assert_close(m.u_mean[2], sm.mean[..., 0], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(m.u_var[2], sm.cov[..., 0, 0], rtol=1e-8, atol=1e-9)


def test_new_values_of_the_other_modes_are_read_from_their_posterior():
    # entries at a value of mode 0 never seen in the fit: absorbed through the GP's
    # interpolation of mode 0's factors; the result is finite and chunk-invariant still
    X, y = _stream_data(seed=3)
    m, rest = _fitted_on_first(X, y, 10.0)
    Xr, yr = X[rest].clone(), y[rest]
    Xr[::7, 0] += 0.5  # between the seen integers
    one, two = copy.deepcopy(m), copy.deepcopy(m)
    one.partial_fit(Xr, yr).smooth()
    half = Xr[:, 2] < 20.0
    two.partial_fit(Xr[half], yr[half]).partial_fit(Xr[~half], yr[~half]).smooth()
    torch.testing.assert_close(two.u_mean[2], one.u_mean[2], rtol=1e-10, atol=1e-10)
    assert bool(torch.isfinite(one.predict(Xr).mean).all())


def test_streaming_forecasts_then_absorbs_and_improves():
    # the next days are forecast before they arrive (finite, wider), and absorbing them
    # makes the fit on those days better than the forecast
    X, y = _stream_data(seed=2)
    m, rest = _fitted_on_first(X, y, 15.0)
    nxt = rest & (X[:, 2] < 18.0)
    fc = m.predict(X[nxt])
    assert bool(torch.isfinite(fc.mean).all())
    m.partial_fit(X[nxt], y[nxt])
    after = m.predict(X[nxt])
    err = lambda p: float(((p.mean - y[nxt]) ** 2).mean().sqrt())  # noqa: E731
    assert err(after) < err(fc), (err(after), err(fc))
    assert float(after.variance.mean()) < float(fc.variance.mean())


def test_partial_fit_refuses_out_of_order_or_unseen_entries():
    X, y = _stream_data()
    m, rest = _fitted_on_first(X, y, 10.0)
    with pytest.raises(ValueError, match="streams in order along mode 2"):
        m.partial_fit(X[:5], y[:5])
    with pytest.raises(ValueError, match="the streaming mode must be continuous"):
        FunctionalTucker([2, 2, 2], modes=["continuous", "continuous", "discrete"],
                         max_iter=2, progress=False).fit(X, y).partial_fit(X[:5], y[:5])
    with pytest.raises(ValueError, match="inner_iter must be a positive int"):
        m.partial_fit(X[rest], y[rest], inner_iter=0)
    with pytest.raises(RuntimeError, match="call fit"):
        FunctionalTucker([2, 2, 2]).partial_fit(X, y)

"""Target standardisation: DKM fits are equivariant to the units and offset of y.

The top-layer kernel has no amplitude and the noise is relative to it, so a DKM fitted to
``c y + b`` in ``y``'s own units cannot be the rescaled fit of ``y``; ``fit`` therefore
models ``z = (y - mean) / std`` and reports in ``y``'s units.
"""

import math

import pyro
import pyro.infer
import pytest
import torch
from dkm_helpers import perturb_grams, toy_regression

from pyro_dkm import fit
from pyro_dkm.dkm import DeepKernelMachine, ExactDeepKernelMachine, select_inducing_points
from pyro_dkm.likelihoods import Poisson, StudentT


def _fitted(y, standardise=None, likelihood="gaussian", steps=60):
    X, _ = toy_regression(40)
    pyro.clear_param_store()
    m = DeepKernelMachine(select_inducing_points(X, 12, seed=0), depth=2, likelihood=likelihood)
    fit(m, X, y, num_steps=steps, progress=False, seed=0, standardise=standardise)
    return m, X


@pytest.mark.parametrize("c, b", [(1e4, 0.0), (1e-4, 0.0), (3.0, -250.0)])
def test_sparse_dkm_fit_rescales_with_y(c, b):
    # fit(c y + b) predicts c * (fit(y)) + b: centre and scale, to 1e-6 relative
    _, y = toy_regression(40)
    m1, X = _fitted(y)
    m2, _ = _fitted(c * y + b)
    Xt, _ = toy_regression(9, seed=3)
    p1, p2 = m1.predict(Xt), m2.predict(Xt)
    torch.testing.assert_close(p2.loc, c * p1.loc + b, rtol=1e-6, atol=1e-6 * c)
    torch.testing.assert_close(p2.scale, c * p1.scale, rtol=1e-6, atol=0)
    # and the learned noise, in standardised units, is the same
    torch.testing.assert_close(m2.noise, m1.noise, rtol=1e-6, atol=0)


def test_without_standardisation_the_fit_is_not_equivariant():
    # the reason for the default: in y's own units a 1e4 rescaling changes the fit
    _, y = toy_regression(40)
    m1, X = _fitted(y, standardise=False)
    m2, _ = _fitted(1e4 * y, standardise=False)
    Xt, _ = toy_regression(9, seed=3)
    rel = float((m2.predict(Xt).loc / 1e4 - m1.predict(Xt).loc).abs().max()
                / m1.predict(Xt).loc.abs().max())
    assert rel > 1e-2, rel


def test_student_t_likelihood_predictive_rescales():
    # a quadrature-mixture predictive: log p(c y*) = log p(y*) - log c at every point
    _, y = toy_regression(40)
    m1, X = _fitted(y, likelihood=StudentT(), steps=30)
    m2, _ = _fitted(1e3 * y, likelihood=StudentT(), steps=30)
    Xt, yt = toy_regression(9, seed=3)
    lp1 = m1.predict(Xt).log_prob(yt)
    lp2 = m2.predict(Xt).log_prob(1e3 * yt)
    torch.testing.assert_close(lp2, lp1 - math.log(1e3), rtol=1e-6, atol=1e-6)


def test_scaled_objective_is_the_density_of_y_and_equals_the_pyro_elbo():
    # objective(y) with scaling = objective of z minus N sum log s (the Jacobian), and
    # -TraceMeanField_ELBO of model() equals it (to 1e-9)
    X, y = toy_regression(30)
    y = 50.0 * y + 7.0
    m = DeepKernelMachine(X[:10], depth=2, nu=[0.5, 2.0])
    perturb_grams(m, 0.2)
    m.set_target_scaling(y)
    loc, scale = y.mean(), y.std(correction=0)
    torch.testing.assert_close(m.y_loc, loc[None])
    torch.testing.assert_close(m.y_scale, scale[None])
    obj = float(m.objective(X, y).detach())
    m2 = DeepKernelMachine(X[:10], depth=2, nu=[0.5, 2.0])
    m2.load_state_dict(m.state_dict())
    m2.set_target_scaling(None)
    obj_z = float(m2.objective(X, (y - loc) / scale).detach())
    assert abs(obj - (obj_z - 30 * math.log(float(scale)))) < 1e-8 * abs(obj)
    pyro.clear_param_store()
    elbo = pyro.infer.TraceMeanField_ELBO().loss(m.model, m.guide, X, y)
    assert abs(-elbo - obj) < 1e-9 * abs(obj), (-elbo, obj)


def test_exact_dkm_standardises_in_its_constructor():
    X, y = toy_regression(15)
    c, b = 1e4, 3e4
    m1 = ExactDeepKernelMachine(X, y, depth=2, nu=[0.3, 3.0])
    m2 = ExactDeepKernelMachine(X, c * y + b, depth=2, nu=[0.3, 3.0])
    perturb_grams(m1, 0.2)
    perturb_grams(m2, 0.2)
    o1, o2 = float(m1.objective().detach()), float(m2.objective().detach())
    assert abs(o2 - (o1 - 15 * math.log(c))) < 1e-9 * abs(o1)
    Xt, _ = toy_regression(6, seed=2)
    p1, p2 = m1.predict(Xt), m2.predict(Xt)
    torch.testing.assert_close(p2.loc, c * p1.loc + b, rtol=1e-9, atol=1e-9 * c)
    torch.testing.assert_close(p2.scale, c * p1.scale, rtol=1e-9, atol=0)
    elbo = pyro.infer.Trace_ELBO().loss(m2.model, m2.guide)
    assert abs(-elbo - o2) < 1e-9 * abs(o2)
    with pytest.raises(ValueError, match="standardises its targets in its constructor"):
        fit(m2, num_steps=2, progress=False, standardise=True)


def test_state_dicts_without_scaling_buffers_still_load():
    X, y = toy_regression(20)
    m = DeepKernelMachine(X[:8], depth=1)
    m.set_target_scaling(10 * y)
    sd = {k: v for k, v in m.state_dict().items() if k not in ("y_loc", "y_scale")}
    m2 = DeepKernelMachine(X[:8], depth=1)
    m2.load_state_dict(sd)  # an older file: the identity scaling
    assert not m2.target_scaled


def test_scaling_needs_a_location_scale_likelihood():
    X, _ = toy_regression(20)
    m = DeepKernelMachine(X[:8], depth=1, likelihood=Poisson())
    with pytest.raises(ValueError, match="Gaussian or Student-t likelihood"):
        m.set_target_scaling(torch.ones(20))
    # fit's default leaves a Poisson DKM's counts alone
    fit(m, X, torch.ones(20), num_steps=2, progress=False)
    assert not m.target_scaled

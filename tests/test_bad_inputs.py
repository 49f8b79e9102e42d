"""Bad input gets a clear error naming the argument, never a silent wrong answer."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_dkm import ExactDeepKernelMachine, ScaleMixtureRegression, fit
from pyro_dkm.gpytorch import NNGPKernel
from pyro_dkm.kernels import Dense, Relu, serial
from pyro_dkm.kernels.keops import keops_matmul
from pyro_dkm.linalg import cholesky, gaussian_log_marginal, solve_tril
from pyro_dkm.processes import StudentTProcess

F64 = torch.float64


def _xy(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def test_linear_algebra_refuses_what_it_would_silently_get_wrong():
    A = torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=F64)  # not symmetric
    with pytest.raises(ValueError, match="A must be symmetric"):
        cholesky(A)  # it used to factorise the lower triangle silently
    with pytest.raises(ValueError, match="zero on its diagonal"):
        solve_tril(torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64), torch.ones(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="lower triangular"):
        solve_tril(torch.tensor([[1.0, 5.0], [1.0, 1.0]], dtype=F64), torch.ones(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="B must have at least 2"):
        solve_tril(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="B must have 3 rows"):
        solve_tril(torch.eye(3, dtype=F64), torch.ones(4, 1, dtype=F64))
    with pytest.raises(ValueError, match="y must have 3 entries"):
        gaussian_log_marginal(torch.eye(3, dtype=F64), torch.ones(4, dtype=F64))
    # symmetric to rounding passes, and the good cases are exact
    S = torch.tensor([[4.0, 2.0], [2.0 + 1e-15, 3.0]], dtype=F64)
    L = cholesky(S)
    torch.testing.assert_close(solve_tril(L, S[:, :1]), torch.linalg.solve_triangular(
        L, S[:, :1], upper=False), rtol=0, atol=0)


def test_models_name_empty_or_foreign_inputs():
    X, y = _xy()
    m = ExactDeepKernelMachine(X, y, depth=1)
    with pytest.raises(ValueError, match="X must have at least one row"):
        m.predict(X[:0])
    with pytest.raises(ValueError, match="trains on the data it was built with"):
        fit(m, X[:5], y[:5], steps=2, progress=False)  # the wrong N would divide the loss
    assert fit(m, steps=2, progress=False).steps == 2
    sm = ScaleMixtureRegression(X, y, dist.Gamma(torch.tensor(2.0, dtype=F64),
                                                 torch.tensor(2.0, dtype=F64)))
    with pytest.raises(ValueError, match="X_new must have at least one row"):
        sm.predict(X[:0])
    with pytest.raises(ValueError, match="0 x 0"):
        StudentTProcess(4.0, torch.zeros(0, 0, dtype=F64))
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor, got ndarray"):
        NNGPKernel()(np.zeros((3, 2)))
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(1.0, 0.0))
    with pytest.raises(TypeError, match="one dtype"):
        keops_matmul(kfn, X, None, torch.ones(10, dtype=torch.float32))


def test_student_t_process_on_a_tensor_that_requires_grad_does_not_warn(recwarn):
    K = torch.eye(3, dtype=F64).requires_grad_()
    StudentTProcess(4.0, K).log_prob(torch.zeros(3, dtype=F64)).backward()
    assert not [w for w in recwarn if "Converting a tensor" in str(w.message)]
    assert K.grad is not None

"""The sparse DKM as a GPyTorch model."""

import gpytorch
import torch

from pyro_dkm.dkm import DeepKernelMachine, select_inducing_points
from pyro_dkm.gpytorch import DeepKernelMachineGP

F64 = torch.float64


def _data(n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    return X, torch.sin(2 * X[:, 0]) * X[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=F64)


def test_variational_elbo_equals_the_closed_form_dkm_objective():
    # GPyTorch's VariationalELBO times N is the sparse DKM objective (same Grams, same
    # q(u), same noise), to 1e-8 relative, full batch and (scaled) minibatch
    X, y = _data()
    Z = select_inducing_points(X, 12)
    gp_model = DeepKernelMachineGP(Z, num_data=80, depth=2, nu=[0.5, 2.0])
    with torch.no_grad():
        for gl in gp_model.dkm.gram_layers:
            gl.gram_tril_offdiag.add_(0.05 * torch.randn_like(gl.gram_tril_offdiag))
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.05
    noise = float(lik.noise.detach()[0])
    gp_model.init_q(X, y, noise=noise)
    mll = gpytorch.mlls.VariationalELBO(lik, gp_model, num_data=80)
    ours = DeepKernelMachine(Z, depth=2, nu=[0.5, 2.0], noise=noise)
    ours.load_state_dict(gp_model.dkm.state_dict())
    assert abs(ours.noise.item() - noise) < 1e-15
    full = mll(gp_model(X), y).item() * 80
    assert abs(full - ours.objective(X, y).item()) < 1e-8 * abs(full)
    idx = torch.arange(20)
    batch = mll(gp_model(X[idx]), y[idx]).item() * 80
    assert abs(batch - ours.objective(X[idx], y[idx], num_data=80).item()) < 1e-8 * abs(batch)


class FeatureDKM(gpytorch.models.GP):
    """A GPyTorch composition: a learned linear feature map, then the DKM GP."""

    def __init__(self, Z):
        super().__init__()
        self.features = torch.nn.Linear(3, 2).double()
        self.gp = DeepKernelMachineGP(Z, num_data=200, depth=1, kernel="sqexp")

    @property
    def variational_strategy(self):
        return self.gp.variational_strategy

    def forward(self, X):
        return self.gp(self.features(X))


def test_dkm_gp_trains_inside_a_gpytorch_composition():
    X, y = _data(200, seed=1)
    torch.manual_seed(0)
    model = FeatureDKM(torch.randn(16, 2, dtype=F64))
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    mll = gpytorch.mlls.VariationalELBO(lik, model, num_data=200)
    opt = torch.optim.Adam(list(model.parameters()) + list(lik.parameters()), lr=0.02)
    w0 = model.features.weight.detach().clone()
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = -mll(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, (losses[0], losses[-1])
    assert (model.features.weight.detach() - w0).abs().max() > 1e-2  # the features train too
    with torch.no_grad():
        pred = lik(model(X))
    rmse = float((pred.mean - y).pow(2).mean().sqrt())
    assert rmse < 0.8 * float(y.std()), (rmse, float(y.std()))

"""Ridge ALS (discrete Tucker / CP baseline and CEP start) on exactly low-rank tensors."""

import pytest
import torch

from pyro_dkm.tucker.als import als_fit, als_predict

D = torch.float64


@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_als_recovers_exact_low_rank_tensor(core):
    # a fully observed 6 x 5 x 4 tensor of multilinear rank 2 is fitted exactly (reg -> 0)
    g = torch.Generator().manual_seed(0)
    shape, R = (6, 5, 4), 2
    U = [torch.randn(n, R, generator=g, dtype=D) for n in shape]
    W = torch.randn(R, R, R, generator=g, dtype=D)
    if core == "cp":
        W = torch.zeros(R, R, R, dtype=D)
        W[0, 0, 0], W[1, 1, 1] = 1.3, -0.7
    T = torch.einsum("abc,ia,jb,kc->ijk", W, *U)
    idx = [i.reshape(-1) for i in torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")]
    y = T.reshape(-1)
    F, w = als_fit(idx, y, [R] * 3, list(shape), reg=1e-10, n_iter=200, core=core, seed=1)
    pred = als_predict(F, w, idx, cp=core == "cp")
    # als_predict is the multilinear map: compare with an einsum of the dense core
    Wd = w.reshape(R, R, R) if core == "tucker" else torch.diag_embed(torch.diag_embed(w))
    ref = torch.einsum("abc,ai,bj,ck->ijk", Wd, *F).reshape(-1)
    torch.testing.assert_close(pred, ref, rtol=1e-12, atol=1e-12)
    assert float(((pred - y) ** 2).mean().sqrt()) < 1e-6 * float(y.std())


def test_als_bad_arguments():
    idx = [torch.zeros(3, dtype=torch.long)] * 3
    with pytest.raises(ValueError, match="reg"):
        als_fit(idx, torch.zeros(3, dtype=D), [1, 1, 1], [1, 1, 1], reg=-1.0)
    with pytest.raises(ValueError, match="core"):
        als_fit(idx, torch.zeros(3, dtype=D), [1, 1, 1], [1, 1, 1], core="parafac")

r"""Convolutional deep kernel machines (Milsom, Anson & Aitchison, ICLR 2024), 1-D and 2-D.

A convolutional network's hidden layer ``F^l`` (positions x channels) has, as its channels
grow, the Gram ``G^l = F^l F^{l T} / N_l`` between every pair of (image, position); a DKM
learns it. The data blocks never couple two images (the output layer only needs each
point's own marginal), so the state of a layer is, for ``B`` images of ``L`` positions
and ``P`` inducing points (:class:`ConvGram`):

* ``ii`` ``(P, P)``: between the inducing points (which have no spatial extent:
  "inter-domain" inducing points, features of a virtual patch);
* ``ti`` ``(B, L, P)``: every position of every image against the inducing points;
* ``tt`` ``(B, L, L)``: each image's own position-by-position block.

Layers (each a map of :class:`ConvGram` states):

* :class:`ConvInput`: the first convolution on the input Gram, against learned inducing
  *patches* ``Z`` ``(P, C, q)`` (or ``(P, C, q, q)``):
  :math:`K_{tt}(s,s') = \tfrac{w}{q}\sum_a x_{s+a}\cdot x'_{s'+a}/C + b`,
  :math:`K_{ti}(s) = \tfrac{w}{qC}\,\mathrm{patch}_s(x)\cdot z_i + b`,
  :math:`K_{ii} = \tfrac{w}{qC} z_i\cdot z_j + b`;
* :class:`ConvKernel`: the nonlinearity's kernel (a :class:`~pyro_dkm.kernels.gram.GramKernel`)
  elementwise on every block;
* :class:`ConvMix`: a later convolution, with a learned mixing ``C_a`` ``(P_out, P_in)``
  per filter tap for the inducing points (their virtual patch at tap ``a`` is
  ``C_a`` times the previous inducing features):
  :math:`K'_{tt}(s,s') = \tfrac{w}{q}\sum_a \Psi_{tt}(s+a, s'+a) + b`,
  :math:`K'_{ti}(s) = \tfrac{w}{q}\sum_a \Psi_{ti}(s+a)\,C_a^T + b`,
  :math:`K'_{ii} = \tfrac{w}{q}\sum_a C_a \Psi_{ii} C_a^T + b`
  (zero "same" padding: the covariance of a real convolution of the joint features, so
  the blocks stay one positive semi-definite Gram);
* :class:`GramPool`: average pooling over non-overlapping windows (positions only);
* :class:`ConvGramLayer`: the learned Gram. ``G_ii`` is a free parameter (as in
  :class:`~pyro_dkm.dkm.layers.GramLayer`); ``G_ti = K_ti K_ii^{-1} G_ii`` and
  :math:`G_{tt} = K_{tt} - K_{ti}K_{ii}^{-1}K_{it} + K_{ti}K_{ii}^{-1}G_{ii}K_{ii}^{-1}K_{it}`
  per image, with the layer's :math:`-\nu\,\mathrm{KL}(\mathcal N(0,G_{ii})\|\mathcal N(0,K_{ii}))`.
  Stochastic kernel regularisation (``skr_dof=gamma``, Milsom et al., NeurIPS 2024): in
  training mode the inducing Gram used downstream is a Wishart draw
  :math:`\tilde G = L\,E E^T L^T/\gamma`, :math:`E \sim \mathcal N(0,1)^{P\times\gamma}`
  (mean ``G_ii``); the KL stays that of ``G_ii``; evaluation uses ``G_ii``;
* :class:`GramBatchNorm`: batch norm on Grams, :math:`G \mapsto DGD` with ``D`` scaling the
  inducing rows by :math:`1/\sqrt{\overline{\mathrm{diag}\,G_{ii}}}` and the data rows by
  :math:`1/\sqrt{\overline{\mathrm{diag}\,G_{tt}}}` (the batch's mean in training, a running
  mean in evaluation): a congruence, so the blocks stay one PSD Gram;
* :class:`GlobalAvgPoolHead`: nonlinearity, global average pooling over positions and a
  dense read-out, giving :class:`~pyro_dkm.dkm.gram_blocks.GramBlocks` for the sparse-GP
  output layer.

At :math:`\nu\to\infty` every learned Gram equals its prior ``K_ii`` and the data blocks
equal the convolutional NNGP of :func:`pyro_dkm.kernels.conv.conv_serial` with the same
filters (tested).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import torch
from pyro.nn import PyroModule
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..kernels.conv import pool_pairs, shift_sum
from ..kernels.gram import ErfGram, GramKernel, ReluGram
from ..linalg import check_tensor, cholesky, nystrom_residual, tril_solve
from .gram_blocks import GramBlocks
from .layers import GramLayer

__all__ = ["ConvGram", "ConvInput", "ConvKernel", "ConvMix", "GramPool", "ConvGramLayer",
           "GramBatchNorm", "GlobalAvgPoolHead", "select_inducing_patches"]


class ConvGram(NamedTuple):
    """A convolutional layer's Gram in inducing form: ``ii`` ``(P, P)``, ``ti``
    ``(B, L, P)``, ``tt`` ``(B, L, L)``; ``shape`` the spatial shape (``L = prod(shape)``)."""

    ii: Tensor
    ti: Tensor
    tt: Tensor
    shape: tuple


def _as_kernel(kernel) -> GramKernel:
    if isinstance(kernel, GramKernel):
        return kernel
    if kernel == "relu":
        return ReluGram()
    if kernel == "erf":
        return ErfGram()
    raise ValueError(f"kernel must be a GramKernel, 'relu' or 'erf', got {kernel!r}")


def _offsets(q: int, ndim: int) -> list[tuple]:
    return list(itertools.product(range(q), repeat=ndim))


def _shift_ti(ti: Tensor, shape: tuple, q: int) -> Tensor:
    """``(B, L, q^D, P)``: ``ti`` at position ``s + a - h`` for every tap ``a``."""
    B, P, D, h = ti.shape[0], ti.shape[-1], len(shape), q // 2
    T = ti.reshape(B, *shape, P)
    pad = (0, 0) + (h, h) * D
    Tp = torch.nn.functional.pad(T, pad)
    outs = [Tp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(a, shape))]
            for a in _offsets(q, D)]
    return torch.stack(outs, -2).reshape(B, math.prod(shape), len(outs), P)


def _patches(X: Tensor, q: int) -> Tensor:
    """``(B, L, C q^D)`` zero-padded patches of ``X`` ``(B, C, *shape)`` around each
    position (channel-major, then taps: the layout of ``Z.reshape(P, -1)``)."""
    h = q // 2
    if X.dim() == 3:
        Xp = torch.nn.functional.pad(X, (h, h)).unfold(-1, q, 1)  # (B, C, L, q)
        return Xp.permute(0, 2, 1, 3).reshape(X.shape[0], X.shape[-1], -1)
    cols = torch.nn.functional.unfold(X, q, padding=h)  # (B, C q q, H W)
    return cols.mT


def _check_q(q, name="q") -> int:
    if not isinstance(q, int) or isinstance(q, bool) or q < 1 or q % 2 == 0:
        raise ValueError(f"{name} (a filter width) must be a positive odd int, got {q!r}")
    return q


@torch.no_grad()
def select_inducing_patches(X: Tensor, num_inducing: int, q: int, *, seed: int = 0) -> Tensor:
    """``num_inducing`` patches of width ``q`` (zero-padded) at random images and
    positions of ``X`` ``(N, C, L)`` or ``(N, C, H, W)``: ``(P, C, q)`` / ``(P, C, q, q)``."""
    check_tensor(X, "X", min_ndim=3)
    if X.dim() not in (3, 4):
        raise ValueError(f"X must be (N, C, L) or (N, C, H, W), got shape {tuple(X.shape)}")
    _check_q(q)
    if not isinstance(num_inducing, int) or num_inducing < 1:
        raise ValueError(f"num_inducing must be a positive int, got {num_inducing!r}")
    g = torch.Generator().manual_seed(seed)
    N, C = X.shape[:2]
    L = math.prod(X.shape[2:])
    n = torch.randint(0, N, (num_inducing,), generator=g)
    s = torch.randint(0, L, (num_inducing,), generator=g)
    patches = _patches(X[n], q)[torch.arange(num_inducing), s]  # (P, C q^D)
    return patches.reshape(num_inducing, C, *([q] * (X.dim() - 2))).clone()


def _variances(weight_var, bias_var):
    w, b = float(weight_var), float(bias_var)
    if not (w > 0 and math.isfinite(w)):
        raise ValueError(f"weight_var must be finite and > 0, got {weight_var}")
    if not (b >= 0 and math.isfinite(b)):
        raise ValueError(f"bias_var must be finite and >= 0, got {bias_var}")
    return w, b


class ConvInput(PyroModule):
    """First convolution, on the input Gram, with learned inducing patches
    ``inducing_points`` ``(P, C, q)`` (1-D) or ``(P, C, q, q)`` (2-D)."""

    def __init__(self, inducing_patches: Tensor, weight_var=1.0, bias_var=0.0,
                 learn_inducing: bool = True):
        super().__init__()
        check_tensor(inducing_patches, "inducing_patches", min_ndim=3)
        if inducing_patches.dim() not in (3, 4):
            raise ValueError(f"inducing_patches must be (P, C, q) or (P, C, q, q), got shape "
                             f"{tuple(inducing_patches.shape)}")
        q = _check_q(inducing_patches.shape[-1], "the inducing patches' width")
        if inducing_patches.dim() == 4 and inducing_patches.shape[-2] != q:
            raise ValueError(f"2-D inducing patches must be square, got shape "
                             f"{tuple(inducing_patches.shape)}")
        self.q, self.ndim = q, inducing_patches.dim() - 2
        self.in_channels = inducing_patches.shape[1]
        self.weight_var, self.bias_var = _variances(weight_var, bias_var)
        Z = inducing_patches.detach().clone()
        if learn_inducing:
            self.inducing_points = torch.nn.Parameter(Z)
        else:
            self.register_buffer("inducing_points", Z)

    def forward(self, X: Tensor) -> ConvGram:
        B, C = X.shape[:2]
        shape = tuple(X.shape[2:])
        Z = self.inducing_points.reshape(self.inducing_points.shape[0], -1)  # (P, C q^D)
        nq = self.q ** self.ndim
        w, b = self.weight_var, self.bias_var
        flat = X.reshape(B, C, -1)
        G0 = flat.mT @ flat / C  # (B, L, L)
        tt = w / nq * shift_sum(G0, shape, self.q) + b
        ti = w / (nq * C) * (_patches(X, self.q) @ Z.mT) + b
        ii = w / (nq * C) * (Z @ Z.mT) + b
        return ConvGram(ii, ti, tt, shape)


class ConvKernel(PyroModule):
    """The nonlinearity: a Gram kernel applied to every block (``"relu"``, ``"erf"`` or a
    :class:`~pyro_dkm.kernels.gram.GramKernel`)."""

    def __init__(self, kernel="relu"):
        super().__init__()
        self.kernel = _as_kernel(kernel)

    def forward(self, G: ConvGram) -> ConvGram:
        k = self.kernel
        d_t = G.tt.diagonal(dim1=-2, dim2=-1)  # (B, L)
        g_i = G.ii.diagonal()
        ii = k(G.ii)
        ti = k.cross(G.ti, d_t[..., None], g_i)
        tt = k.cross(G.tt, d_t[:, :, None], d_t[:, None, :])
        tt = tt.diagonal_scatter(k.diag(d_t), dim1=-2, dim2=-1)
        return ConvGram(ii, ti, tt, G.shape)


class ConvMix(PyroModule):
    """A later convolution of filter width ``q`` (odd) over ``ndim`` spatial dimensions;
    the inducing points mix through a learned ``mixing`` ``(q^D, P_out, P_in)`` per tap,
    initialised at the identity plus ``N(0, init_noise^2 / P_in)``."""

    def __init__(self, q: int, num_inducing: int, *, ndim: int = 1, weight_var=1.0,
                 bias_var=0.0, in_inducing: int | None = None, init_noise: float = 0.1,
                 seed: int = 0):
        super().__init__()
        self.q, self.ndim = _check_q(q), int(ndim)
        self.weight_var, self.bias_var = _variances(weight_var, bias_var)
        P_in = num_inducing if in_inducing is None else in_inducing
        g = torch.Generator().manual_seed(seed)
        nq = q ** self.ndim
        C = torch.eye(num_inducing, P_in, dtype=torch.float64).expand(nq, -1, -1).clone()
        C += init_noise / math.sqrt(P_in) * torch.randn(C.shape, generator=g,
                                                        dtype=torch.float64)
        self.mixing = torch.nn.Parameter(C)

    def forward(self, G: ConvGram) -> ConvGram:
        nq = self.q ** self.ndim
        w, b = self.weight_var, self.bias_var
        Cm = self.mixing  # (nq, Po, Pi)
        tt = w / nq * shift_sum(G.tt, G.shape, self.q) + b
        S = _shift_ti(G.ti, G.shape, self.q)  # (B, L, nq, Pi)
        ti = w / nq * torch.einsum("blaj,aij->bli", S, Cm) + b
        ii = w / nq * torch.einsum("aij,jk,alk->il", Cm, G.ii, Cm) + b
        return ConvGram(0.5 * (ii + ii.mT), ti, tt, G.shape)


class GramPool(PyroModule):
    """Average pooling over non-overlapping windows of ``p`` positions (per spatial
    dimension; each size divisible by ``p``). Inducing points are unaffected."""

    def __init__(self, p: int):
        super().__init__()
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"p (the pooling window) must be a positive int, got {p!r}")
        self.p = p

    def forward(self, G: ConvGram) -> ConvGram:
        p, shape = self.p, G.shape
        if p == 1:
            return G
        if any(n % p for n in shape):
            raise ValueError(f"GramPool({p}) needs spatial sizes divisible by {p}, got {shape}")
        tt, new = pool_pairs(G.tt, shape, p)
        B, P, D = G.ti.shape[0], G.ti.shape[-1], len(shape)
        split = sum(((n, p) for n in new), ())
        ti = G.ti.reshape(B, *split, P).mean(tuple(2 + 2 * i for i in range(D)))
        return ConvGram(G.ii, ti.reshape(B, math.prod(new), P), tt, new)


class ConvGramLayer(GramLayer):
    r"""Learned Gram of a convolutional layer (see the module docstring); the
    parameterisation, KL and ``nu`` of :class:`~pyro_dkm.dkm.layers.GramLayer`, plus
    ``skr_dof``: Wishart degrees of freedom of stochastic kernel regularisation (training
    mode only; ``None``: off)."""

    def __init__(self, num_inducing: int, nu: float = 1.0, kl: str = "exact",
                 parameterisation: str = "cholesky", skr_dof: int | None = None):
        super().__init__(num_inducing, nu=nu, kl=kl, parameterisation=parameterisation)
        if skr_dof is not None and (isinstance(skr_dof, bool) or not isinstance(skr_dof, int)
                                    or skr_dof < 1):
            raise ValueError(f"skr_dof must be None or a positive int, got {skr_dof!r}")
        self.skr_dof = skr_dof

    def sample_factor(self, G_tril: Tensor) -> Tensor:
        """``F`` ``(P, gamma)`` with ``F F^T`` a Wishart draw of mean ``G_tril G_tril^T``."""
        gamma = self.skr_dof
        E = torch.randn(G_tril.shape[-1], gamma, dtype=G_tril.dtype, device=G_tril.device)
        return G_tril @ E / math.sqrt(gamma)

    def forward(self, K: ConvGram) -> tuple[ConvGram, Tensor]:
        K_tril = cholesky(K.ii, name="K_ii (kernel at the inducing points)")
        G_tril = self.factor(K_tril)
        kl = self.kl(K.ii, G_tril, K_tril)
        F = self.sample_factor(G_tril) if (self.training and self.skr_dof) else G_tril
        B, L, P = K.ti.shape
        A = tril_solve(K_tril, K.ti.reshape(B * L, P).mT)  # (P, B L)
        BtA = tril_solve(K_tril, F).mT @ A  # (r, B L)
        ii = F @ F.mT
        ti = (BtA.mT @ F.mT).reshape(B, L, P)
        A3, C3 = A.reshape(P, B, L), BtA.reshape(-1, B, L)
        tt = K.tt - torch.einsum("pbs,pbt->bst", A3, A3) + torch.einsum("rbs,rbt->bst", C3, C3)
        # the diagonal's Nystrom residual is floored at its rounding level (float32 safe)
        diag = (nystrom_residual(K.tt.diagonal(dim1=-2, dim2=-1).reshape(-1), A)
                + BtA.pow(2).sum(0)).reshape(B, L)
        tt = tt.diagonal_scatter(diag, dim1=-2, dim2=-1)
        return ConvGram(ii, ti, 0.5 * (tt + tt.mT), K.shape), kl

    def extra_repr(self) -> str:
        return super().extra_repr() + f", skr_dof={self.skr_dof}"


class GramBatchNorm(PyroModule):
    r"""Batch norm on Grams: :math:`G \mapsto D G D`, the inducing rows scaled by
    :math:`a = (\overline{\mathrm{diag}\,G_{ii}})^{-1/2}` and the data rows by
    :math:`b = (\overline{\mathrm{diag}\,G_{tt}})^{-1/2}`, the mean over the batch's images
    and positions in training mode (and a running mean, ``momentum``, kept), the running
    mean in evaluation mode (so a point's prediction does not depend on its batch)."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("running_diag", torch.ones((), dtype=torch.float64))

    def forward(self, G: ConvGram) -> ConvGram:
        if self.training:
            m = G.tt.diagonal(dim1=-2, dim2=-1).mean()
            with torch.no_grad():
                self.running_diag.mul_(1 - self.momentum).add_(self.momentum * m.detach())
        else:
            m = self.running_diag.to(G.tt.dtype)
        a = G.ii.diagonal().mean().rsqrt()
        b = m.rsqrt()
        return ConvGram(G.ii * a * a, G.ti * (a * b), G.tt * (b * b), G.shape)


class GlobalAvgPoolHead(PyroModule):
    r"""Nonlinearity, then a read-out of the positions, then a dense layer ``w k + b``: the
    output GP's kernel blocks.

    * ``readout="gap"``: global average pooling, :math:`k_{tt} = \overline{\Psi_{tt}(s,s')}`,
      the inducing points read out through a learned ``mixing`` ``(P, P)`` (identity at the
      start);
    * ``readout="flatten"``: a dense layer over the flattened positions (as a CNN's
      read-out; keeps where a feature is), :math:`k_{tt} = \tfrac1L\sum_s \Psi_{tt}(s,s)`,
      an inducing point reads position ``s`` through its own ``mixing[s]`` ``(P, P)``
      (``num_positions`` of them, identity plus ``N(0, 0.1^2/P)`` at the start).
    """

    def __init__(self, num_inducing: int, kernel="relu", weight_var=1.0, bias_var=0.0,
                 readout: str = "gap", num_positions: int | None = None, seed: int = 0):
        super().__init__()
        if readout not in ("gap", "flatten"):
            raise ValueError(f"readout must be 'gap' or 'flatten', got {readout!r}")
        self.kernel = _as_kernel(kernel)
        self.readout = readout
        self.weight_var, self.bias_var = _variances(weight_var, bias_var)
        P = num_inducing
        if readout == "gap":
            self.mixing = torch.nn.Parameter(torch.eye(P, dtype=torch.float64))
        else:
            if not isinstance(num_positions, int) or num_positions < 1:
                raise ValueError(f"readout='flatten' needs num_positions (the positions left "
                                 f"before the read-out), got {num_positions!r}")
            g = torch.Generator().manual_seed(seed)
            C = torch.eye(P, dtype=torch.float64).expand(num_positions, P, P).clone()
            C += 0.1 / math.sqrt(P) * torch.randn(C.shape, generator=g, dtype=torch.float64)
            self.mixing = torch.nn.Parameter(C)

    def forward(self, G: ConvGram) -> GramBlocks:
        k, w, b = self.kernel, self.weight_var, self.bias_var
        d_t = G.tt.diagonal(dim1=-2, dim2=-1)
        g_i = G.ii.diagonal()
        Psi_ii = k(G.ii)
        Psi_ti = k.cross(G.ti, d_t[..., None], g_i)  # (B, L, P)
        Cm = self.mixing
        if self.readout == "flatten":
            L = Psi_ti.shape[1]
            if Cm.shape[0] != L:
                raise ValueError(f"the flatten read-out was built for {Cm.shape[0]} positions, "
                                 f"the input has {L} after pooling")
            ii = w / L * torch.einsum("sij,jk,slk->il", Cm, Psi_ii, Cm) + b
            ti = w / L * torch.einsum("bsj,sij->bi", Psi_ti, Cm) + b
            return GramBlocks(0.5 * (ii + ii.mT), ti, w * k.diag(d_t).mean(-1) + b)
        Psi_tt = k.cross(G.tt, d_t[:, :, None], d_t[:, None, :])
        Psi_tt = Psi_tt.diagonal_scatter(k.diag(d_t), dim1=-2, dim2=-1)
        ii = w * Cm @ Psi_ii @ Cm.mT + b
        return GramBlocks(0.5 * (ii + ii.mT), w * Psi_ti.mean(1) @ Cm.mT + b,
                          w * Psi_tt.mean((-2, -1)) + b)


def run_layers(layers: Sequence, G, use_checkpoint: bool = False):
    """Apply conv-DKM layers in order; returns the final state and the Gram layers' KLs.
    ``use_checkpoint``: recompute each layer in the backward pass instead of storing its
    activations (memory bounded by one layer)."""
    kls = []
    for layer in layers:
        if use_checkpoint and torch.is_grad_enabled():
            out = checkpoint(layer, G, use_reentrant=False)
        else:
            out = layer(G)
        if isinstance(layer, ConvGramLayer):
            G, kl = out
            kls.append(kl)
        else:
            G = out
    return G, kls

"""A convolutional deep kernel machine on MNIST-1D, beside its NNGP limit.

Builds MNIST-1D locally (the ``mnist1d`` package, the published set: 4000 training and
1000 test sequences of length 40, 10 classes) and trains a
:class:`pyro_dkm.ConvDeepKernelMachine` (three learned Gram layers, filters 5/3/3, average
pooling, ReLU kernels, 128 inducing patches, global average pooling, tempered softmax)
by Adam on its minibatch objective; then, with ``--nngp``, the same model with its
Grams frozen at the prior (nu = inf). Prints test accuracy and log-likelihood as it goes.
``--plot PATH`` draws the first layer's learned position-by-position Gram of one test
sequence per class next to the NNGP's (where representation learning changed the
kernel).

    python examples/conv_dkm_mnist1d.py                # about 4 minutes on 2 CPU cores
    python examples/conv_dkm_mnist1d.py --epochs 60 --nngp --plot grams.png
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pyro_dkm import ConvDeepKernelMachine
from pyro_dkm.dkm import select_inducing_patches


def load(seed: int = 42):
    from mnist1d.data import get_dataset_args, make_dataset

    a = get_dataset_args()
    a.seed = seed
    d = make_dataset(a)
    f = torch.float64
    return (torch.tensor(d["x"], dtype=f)[:, None], torch.tensor(d["y"]),
            torch.tensor(d["x_test"], dtype=f)[:, None], torch.tensor(d["y_test"]))


@torch.no_grad()
def evaluate(model, Xt, yt):
    p = model.predict(Xt, batch_size=500).probs
    return float((p.argmax(-1) == yt).double().mean()), float(
        p.gather(-1, yt[:, None]).log().mean())


def train(model, X, y, Xt, yt, epochs, lr=1e-2, batch_size=128, label="conv DKM"):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    N = X.shape[0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(N / batch_size))
    start = time.perf_counter()
    for ep in range(epochs):
        for idx in torch.randperm(N).split(batch_size):
            opt.zero_grad()
            (-model.objective(X[idx], y[idx], num_data=N) / N).backward()
            opt.step()
            sched.step()
        if (ep + 1) % max(1, epochs // 4) == 0 or ep == epochs - 1:
            acc, ll = evaluate(model, Xt, yt)
            print(f"{label:18s} epoch {ep + 1:3d}: test accuracy {acc:.3f}, test LL {ll:.3f} "
                  f"({(time.perf_counter() - start) / (ep + 1):.1f} s/epoch)", flush=True)
    return evaluate(model, Xt, yt)


def build(X, nu, seed):
    """``nu = inf`` holds every learned Gram at its prior: the conv NNGP kernel machine."""
    Z = select_inducing_patches(X, 128, 5, seed=seed)
    return ConvDeepKernelMachine(Z, filters=(3, 3), pool=(2, 2, 1), nu=nu, out_channels=10)


def plot_grams(model, nngp, Xt, yt, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = torch.stack([torch.nonzero(yt == c)[0, 0] for c in range(0, 10, 2)])
    learned = model.hidden_grams(Xt[idx])[0].tt
    prior = nngp.hidden_grams(Xt[idx])[0].tt
    fig, ax = plt.subplots(3, len(idx), figsize=(2.2 * len(idx), 6.6))
    for j in range(len(idx)):
        ax[0, j].plot(Xt[idx[j], 0].numpy())
        ax[0, j].set_title(f"class {int(yt[idx[j]])}")
        ax[1, j].imshow(prior[j].numpy(), cmap="viridis")
        ax[2, j].imshow(learned[j].numpy(), cmap="viridis")
        for a in ax[1:, j]:
            a.set_xticks([])
            a.set_yticks([])
    ax[1, 0].set_ylabel("NNGP Gram, layer 1")
    ax[2, 0].set_ylabel("learned Gram, layer 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--nu", type=float, default=1.0,
                   help="the benchmark's validation choice on MNIST-1D")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=42)
    p.add_argument("--nngp", action="store_true", help="also train the nu = inf model")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    X, y, Xt, yt = load(args.data_seed)
    torch.manual_seed(args.seed)
    model = build(X, args.nu, args.seed)
    acc, ll = train(model, X, y, Xt, yt, args.epochs, label=f"conv DKM nu={args.nu:g}")
    print(f"conv DKM (nu={args.nu:g}): test accuracy {acc:.4f}, test log-likelihood {ll:.4f}")
    nngp = build(X, math.inf, args.seed)
    if args.nngp:
        torch.manual_seed(args.seed)
        acc0, ll0 = train(nngp, X, y, Xt, yt, args.epochs, label="conv NNGP (nu=inf)")
        print(f"conv NNGP (nu=inf): test accuracy {acc0:.4f}, test log-likelihood {ll0:.4f}")
    if args.plot:
        plot_grams(model, nngp, Xt, yt, args.plot)


if __name__ == "__main__":
    main()

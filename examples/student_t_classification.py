"""Student-t process vs Gaussian process classification on scikit-learn's digits.

Trains a sparse variational GP (SVGP) and a sparse variational Student-t process (SVTP:
the NNGP's last-layer variance ``s ~ InvGamma(a, b)`` as a latent with a variational
inverse-gamma posterior) with the same NNGP kernel, inducing points, optimiser and noise,
and prints test accuracy and NLL on clean, noisy and blurred test images (< 1 minute).

    python examples/student_t_classification.py
    python examples/student_t_classification.py --steps 1500 --inducing 100
"""

from __future__ import annotations

import argparse

import torch
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits

from pyro_dkm.processes.classification import (
    NNGPCovariance,
    SVGPClassifier,
    SVTPClassifier,
    classification_metrics,
    fit_classifier,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--inducing", type=int, default=50)
    p.add_argument("--a", type=float, default=2.0, help="inverse-gamma shape (df = 2a)")
    p.add_argument("--b", type=float, default=2.0, help="inverse-gamma rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0)  # (1797, 64) float64 in [0, 1]
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1200], perm[1200:]
    Z = X[tr[:args.inducing]]  # the same inducing inputs for both models

    noisy = (X[te] + 0.3 * torch.randn(X[te].shape, generator=g, dtype=X.dtype)).clamp(0, 1)
    blurred = torch.tensor(gaussian_filter(X[te].numpy().reshape(-1, 8, 8), sigma=(0, 1, 1),
                                           mode="constant").reshape(-1, 64))
    tests = {"clean": X[te], "noise 0.3": noisy, "blur 1.0": blurred}

    # depth-2 ReLU NNGP kernel; its amplitude is the scale s: a learned point estimate in the
    # SVGP, integrated under q(s) with s ~ InvGamma(a, b) in the SVTP
    models = {"SVGP": SVGPClassifier(Z, 10, kernel=NNGPCovariance(depth=2, learn_variance=False)),
              "SVTP": SVTPClassifier(Z, 10, a=args.a, b=args.b,
                                     kernel=NNGPCovariance(depth=2, learn_variance=False))}
    print(f"{'model':6s} " + " ".join(f"{name:>20s}" for name in tests))
    for name, model in models.items():
        res = fit_classifier(model, X[tr], y[tr], num_steps=args.steps, batch_size=256, lr=0.02,
                             seed=args.seed)
        cells = []
        for Xt in tests.values():
            probs = model.predict_proba(Xt, num_samples=256)
            acc, nll = classification_metrics(probs, y[te])
            cells.append(f"acc {acc:.3f} NLL {nll:.3f}")
        print(f"{name:6s} " + " ".join(f"{c:>20s}" for c in cells)
              + f"   ({res.seconds:.1f} s)")
        if name == "SVTP":
            q = model.scale_posterior_dist()
            print(f"       q(s): InvGamma({q.base_dist.concentration.item():.1f}, "
                  f"{q.base_dist.rate.item():.1f}), mean {q.mean.item():.3f}")


if __name__ == "__main__":
    main()

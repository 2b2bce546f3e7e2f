"""A one-minute demo of the norms library: BN vs Batch Renorm vs GroupNorm at batch 2.

``python -m norms.demo [--steps N] [--batch B]`` trains the same small CNN three times on a
learnable synthetic task (which way a noisy bar points, drawn at a random brightness, so
per-batch statistics really are noisy) and prints validation accuracy with eval-mode
(running-statistics) normalization.  ``make demo`` runs it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from norms import available_norms, build_norm, convert_norms

CLASSES = 4  # horizontal, vertical, diagonal, anti-diagonal bar


def make_data(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 1, size, size)
    for i, label in enumerate(labels.tolist()):
        c = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
        dist = [
            (yy - c[0]).abs(),
            (xx - c[1]).abs(),
            ((yy - c[0]) - (xx - c[1])).abs() / 1.4,
            ((yy - c[0]) + (xx - c[1])).abs() / 1.4,
        ][label]
        bar = (dist < 1.5).float()
        gain = 0.5 + 2.0 * torch.rand((), generator=g)
        offset = torch.randn((), generator=g)
        images[i, 0] = gain * bar + offset + 0.5 * torch.randn(size, size, generator=g)
    return images, labels


def make_model(kind: str) -> nn.Module:
    def block(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    model = nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )
    extra = {"brn": {"warmup_steps": 100}}.get(kind, {})
    return convert_norms(model, kind, **extra)


def run(kind: str, train, val, steps: int, batch: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(val[0]).argmax(1) == val[1]).float().mean().item()
    return acc, loss.item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train = make_data(2000, 24, seed=1)
    val = make_data(500, 24, seed=2)
    print(
        f"norms demo: 3-block CNN, batch {args.batch}, {args.steps} SGD steps, "
        f"eval with running statistics (registered kinds: {', '.join(available_norms())})"
    )
    print(f"{'kind':<6} {'val acc':>8} {'last loss':>10} {'time':>6}")
    for kind in ("bn", "brn", "gn"):
        t0 = time.perf_counter()
        acc, loss = run(kind, train, val, args.steps, args.batch, args.seed)
        print(f"{kind:<6} {acc:8.3f} {loss:10.3f} {time.perf_counter() - t0:5.1f}s")
    layer = build_norm("brn", 32)
    print(f"\nbuild_norm('brn', 32) -> {layer}")


if __name__ == "__main__":
    main()

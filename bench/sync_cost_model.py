"""A cost model (not a measurement) of SyncBN's communication per training step: every
rank in one group vs groups of the policy's size inside a node.

    python bench/sync_cost_model.py

Per synchronized layer and step, torch's NCCL SyncBN all-gathers each rank's (mean,
invstd, count) in the forward pass, 2C+1 float32, and all-reduces (sum dy, sum dy*x_hat),
2C float32, in the backward pass.  Collective times follow the usual alpha-beta model:

    ring all-gather of m bytes per rank over n ranks:  (n - 1) * (alpha + m * beta)
    tree all-reduce of M bytes over n ranks:            2 * log2(n) * alpha + 2 * M * beta

with NCCL-typical constants for small messages (stated below, not measured here):
alpha 5 us and 1/150 GB/s inside a node (NVLink), alpha 12 us and 1/25 GB/s once a
collective crosses nodes (200 Gb/s InfiniBand).  The model: ResNet-50 (53 BN layers,
mean width 560 channels) at 2 images per GPU, 8 GPUs per node, min_batch 16, so the
policy's auto groups are the 8 GPUs of a node.
"""

from __future__ import annotations

import math

LAYERS, CHANNELS, PER_NODE, GROUP = 53, 560, 8, 8
INTRA = (5e-6, 1 / 150e9)
INTER = (12e-6, 1 / 25e9)


def per_layer_s(n: int) -> float:
    alpha, beta = INTRA if n <= PER_NODE else INTER
    gather = (n - 1) * (alpha + (2 * CHANNELS + 1) * 4 * beta)
    reduce = 2 * math.log2(n) * alpha + 2 * (2 * CHANNELS * 4) * beta
    return gather + reduce


def table() -> str:
    lines = [
        "| GPUs | bytes per rank per layer (fwd + bwd) | world sync: per layer | per step "
        f"({LAYERS} layers) | groups of {GROUP} in a node: per layer | per step | saving |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in (8, 64, 256, 1024):
        world, group = per_layer_s(n), per_layer_s(min(GROUP, n))
        lines.append(
            f"| {n} | {(2 * CHANNELS + 1) * 4 + 2 * CHANNELS * 4} | {world * 1e6:.0f} us | "
            f"{world * LAYERS * 1e3:.1f} ms | {group * 1e6:.0f} us | "
            f"{group * LAYERS * 1e3:.1f} ms | {world / group:.0f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

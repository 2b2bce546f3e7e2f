"""A cost model (not a measurement) of SyncBN's communication per training step: every
rank in one group vs groups of the policy's size inside a node.

    python -m bench.sync_cost_model

Per synchronized layer and step, torch's NCCL SyncBN all-gathers each rank's (mean,
invstd, count) in the forward pass, 2C+1 float32, and all-reduces (sum dy, sum dy*x_hat),
2C float32, in the backward pass.  Collective times follow the usual alpha-beta model:

    ring all-gather of m bytes per rank over n ranks:  (n - 1) * (alpha + m * beta)
    tree all-reduce of M bytes over n ranks:            2 * log2(n) * alpha + 2 * M * beta

with NCCL-typical constants for small messages (stated below, not measured here):
alpha 5 us and 1/150 GB/s inside a node (NVLink), alpha 12 us and 1/25 GB/s once a
collective crosses nodes (200 Gb/s InfiniBand).  The model: ResNet-50 (53 BN layers,
mean width 560 channels) at 2 images per GPU, 8 GPUs per node; the group size is the
policy's own (``norms.policy.sync_group_size`` with the default settings).  Writes
bench/results/sync_cost_model.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from norms.policy import NormPolicy, sync_group_size

LAYERS, CHANNELS, PER_NODE, BATCH = 53, 560, 8, 2
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
INTRA = (5e-6, 1 / 150e9)
INTER = (12e-6, 1 / 25e9)


def per_layer_s(n: int) -> float:
    alpha, beta = INTRA if n <= PER_NODE else INTER
    gather = (n - 1) * (alpha + (2 * CHANNELS + 1) * 4 * beta)
    reduce = 2 * math.log2(n) * alpha + 2 * (2 * CHANNELS * 4) * beta
    return gather + reduce


def table() -> str:
    p = NormPolicy()
    lines = [
        "| GPUs | bytes per rank per layer (fwd + bwd) | world sync: per layer | per step "
        f"({LAYERS} layers) | auto group (ranks) | per layer | per step | saving |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in (8, 64, 256, 1024):
        size, _ = sync_group_size(n, BATCH, p, local_world_size=PER_NODE)
        world, group = per_layer_s(n), per_layer_s(size)
        lines.append(
            f"| {n} | {(2 * CHANNELS + 1) * 4 + 2 * CHANNELS * 4} | {world * 1e6:.0f} us | "
            f"{world * LAYERS * 1e3:.1f} ms | {size} | {group * 1e6:.0f} us | "
            f"{group * LAYERS * 1e3:.1f} ms | {world / group:.0f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    out = ap.parse_args().out
    text = (
        f"A model, not a measurement (bench/sync_cost_model.py): ResNet-50's {LAYERS} BN "
        f"layers of {CHANNELS} channels on average, {BATCH} images per GPU, {PER_NODE} GPUs "
        f"per node, NCCL-typical alpha-beta constants; the auto group is the policy's "
        f"(min_batch {NormPolicy().min_batch}).\n\n{table()}\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "sync_cost_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Detection loading against the training step's demand: is the loader a bottleneck?

    python -m bench.loader            # -> bench/results/loader.{json,md}
    python -m bench.loader --quick    # a smoke-test size

Images: the embedded scenes generator at 640 px on the long side (320-640 px JPEGs, both
orientations), read by the trainer's own ``CocoDetection`` with training augmentation
(decode, to float, flip, colour jitter).  Measured in one process, which is what one
loader worker does, side by side in interleaved rounds:

* ``pil``: the trainer's decoder (PIL, what ``CocoDetection`` uses);
* ``torchvision``: ``torchvision.io.decode_image`` (libjpeg-turbo), which torchvision
  0.29 deprecates in favour of TorchCodec: measured to say what the trainer gives up.

Demand: images/s of the scenes preset's training step (FCOS ResNet-18, its multi-scale
sizing, batch 4) on in-memory batches on this machine, and the workers that takes:
demand / (images/s per worker).  On a GPU the step is many times faster, so the same
per-worker figure says how many workers a GPU needs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import machine, write_results

ROOT = Path(__file__).resolve().parents[1]


def _decode_tv(path: Path):
    from torchvision.io import ImageReadMode, decode_image, read_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # measured, not adopted
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def per_worker(ds, rounds: int) -> dict[str, float]:
    """Images/s of ``ds[i]`` over the whole set, per decoder, in interleaved rounds.  The
    torchvision decoder replaces the dataset's ``load_rgb`` for its rounds (its uint8
    tensor goes on to ``to_image`` as PIL's image does)."""
    from trainer.data import coco

    decoders = {"pil": coco.load_rgb, "torchvision": _decode_tv}
    times: dict[str, list[float]] = {k: [] for k in decoders}
    try:
        for i in range(rounds):
            for name in list(decoders)[i % 2 :] + list(decoders)[: i % 2]:
                coco.load_rgb = decoders[name]
                t0 = time.perf_counter()
                for j in range(len(ds)):
                    ds[j]
                times[name].append(len(ds) / (time.perf_counter() - t0))
    finally:
        coco.load_rgb = decoders["pil"]
    return {k: statistics.median(v) for k, v in times.items()}


def step_demand(ds, steps: int, batch: int = 4) -> float:
    """Images/s the scenes preset's training step consumes on this machine."""
    from trainer.config import load_config
    from trainer.distributed import DistEnv
    from trainer.plan import plan_run
    from trainer.step import train_step
    from trainer.training import build_training

    cfg = load_config(ROOT / "configs/scenes_det.yaml", ["run.device=cpu", "wandb.mode=disabled"])
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", 1)
    t = build_training(cfg, env, plan_run(cfg, 1, "cpu"))
    items = [ds[i] for i in range(batch)]
    data = ([im for im, _ in items], [tg for _, tg in items])
    train_step(t, [data])  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(t, [data])
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    n, rounds, steps = (8, 2, 2) if args.quick else (64, 5, 10)
    torch.set_num_threads(1)  # a loader worker's share; the step below takes the machine's
    from trainer.data.coco import CocoDetection
    from trainer.data.scenes import ensure_scenes

    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_scenes(tmp, n, 1, 640)
        ds = CocoDetection(
            root / "train", root / "annotations" / "instances_train.json", train=True,
            color_jitter=0.2,
        )  # fmt: skip
        worker = per_worker(ds, rounds)
        torch.set_num_threads(torch.get_num_threads() if args.quick else max(1, _cpus()))
        demand = step_demand(ds, steps)
    row = {
        "images": n,
        "pil_per_worker": worker["pil"],
        "torchvision_per_worker": worker["torchvision"],
        "step_demand": demand,
        "workers_needed": demand / worker["pil"],
        "machine": machine(),
    }
    table = "\n".join(
        [
            "| decoder | images/s per worker | workers for this machine's step |",
            "|---|---:|---:|",
            f"| PIL (the trainer's) | {row['pil_per_worker']:.0f} | {row['workers_needed']:.2f} |",
            f"| torchvision.io.decode_image (deprecated) | {row['torchvision_per_worker']:.0f} "
            f"| {demand / worker['torchvision']:.2f} |",
        ]
    )
    caption = (
        f"Loading 640-px scenes JPEGs with training augmentation, one process (a worker), "
        f"median of {rounds} interleaved rounds over {n} images, against the scenes "
        f"preset's training step on this machine ({demand:.1f} images/s at batch 4); "
        f"{row['machine']} (bench/loader.py):"
    )
    name = "loader_quick" if args.quick else "loader"
    write_results(args.out, name, [row], caption, table)
    print(caption + "\n\n" + table)
    return 0


def _cpus() -> int:
    from trainer.cpus import cpus_available

    return cpus_available()


if __name__ == "__main__":
    raise SystemExit(main())

"""The classification study: validation accuracy against per-device batch for each norm.

    python -m bench.study --norms bn brn brn_m01 brn_paper gn --seeds 5   # make study-cls
    python -m bench.study --quick    # 2 batch sizes, 1 seed, a few hundred samples (~15 s)

``SmallResNet`` (bench/smallresnet.py: torchvision BasicBlocks, widths 16-32-64-128-128)
is trained on the embedded shapes classification data at 16 px.  Its fifth stage works
at 1x1, so BatchNorm normalizes each channel there over just B values: the regime where
batch statistics fail.  Lines: ``bn``, the Batch Renorm variants (``brn``, ``brn_m01``,
``brn_paper``), ``gn`` (+ Weight Standardization) on one process; ``syncbn`` and
``syncbrn`` on 2 gloo processes of B each, which the report can also read from the
1-process cells at 2B (the same training in exact arithmetic).  Every BN-family run is
evaluated with its running statistics and again after precise BN.

Every cell sees the same samples in the same order for a given seed, with AdamW, the
trainer's optimizer and warm-up + cosine schedule (``trainer.optim``), and ``--lr`` given
for ``--ref-batch`` and scaled with the square root of the global batch (the rule for
Adam-type optimizers; ``--lr-scaling linear`` is the trainer's rule for SGD).  Every run
takes at least ``--min-steps`` optimizer steps, so the largest batch is not
under-trained (bench/results/study_cls_b32_budget.md).  The loop is its own, not the
trainer's: the data are 16 px tensors held in memory, where a DataLoader per epoch would
cost more than the step; the trainer's own overhead over such a loop is measured by
bench/speed.py.

Writes ``<name>.json``, ``.md`` and ``.png`` to --out (default study_cls), one file per
cell under ``<name>_cells/`` (reused when present), and unless --no-wandb offline wandb
runs, one per training run, grouped per cell (``cls_<norm>_b<B>_w<world>``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from bench.common import CellStore, machine, recipe_of
from bench.smallresnet import BASE_KIND, WIDTHS, build, load_tensors
from bench.stats import run_steps

# Re-exported: the study's public face is this script.
from bench.study_output import render, report
from bench.study_report import CLIP_STATS, NORMS
from norms import (
    available_norms,
    is_sync_kind,
    precise_bn,
    renorm_diagnostics,
    running_stat_layers,
)
from trainer.distributed import spawn_gloo
from trainer.optim import build_optimizer, build_scheduler, scaled_lr

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_NORMS = ("bn", "brn", "gn", "syncbn")
SYNC = tuple(k for k in available_norms() if is_sync_kind(k))  # run on 2 gloo processes


# -- one training run ------------------------------------------------------------------


def train_cell(cell: dict, data_path: str, rank: int = 0, world: int = 1) -> dict:
    """Train one (norm, batch, seed) cell; return its row: the cell, validation accuracy
    and loss, steps, time, a weights fingerprint, Batch Renorm's clip diagnostics."""
    data = torch.load(data_path, weights_only=True)
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    batch, seed = cell["batch"], cell["seed"]
    global_batch = batch * world
    steps = run_steps(cell, global_batch)
    torch.manual_seed(seed)  # same initial weights for every norm with this seed
    model = build(cell["norm"], steps, tuple(cell.get("widths", WIDTHS)))
    clips = _ClipMeter(model) if cell["norm"] in BASE_KIND else None
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = build_optimizer(
        model, cell["optimizer"], _lr(cell, global_batch), 0.9, cell["weight_decay"]
    )
    sched = build_scheduler(opt, max(1, steps // 20), steps)
    order = torch.Generator().manual_seed(seed)
    n = len(x_train)
    perm, cursor = torch.randperm(n, generator=order), 0
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        if cursor + global_batch > n:
            perm, cursor = torch.randperm(n, generator=order), 0
        idx = perm[cursor : cursor + global_batch][rank * batch : (rank + 1) * batch]
        cursor += global_batch
        x = x_train[idx]
        # Drawn for the global batch, then sliced: a 2-process step sees exactly the
        # samples (and flips) of a 1-process step at twice the batch.
        flip = (torch.rand(global_batch, generator=order) < 0.5)[rank * batch : (rank + 1) * batch]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = nn.functional.cross_entropy(net(x), y_train[idx])
        if not torch.isfinite(loss):
            break  # diverged: evaluated as is (typically chance accuracy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if clips is not None:
            clips.sample(step)
    seconds = time.perf_counter() - t0
    acc, val_loss = _evaluate(model, x_val, y_val)  # running statistics, as deployed
    precise = _after_precise_bn(model, data, seed, slice(rank * batch, (rank + 1) * batch), world)
    # A fingerprint of the trained weights (tests compare runs that must agree).
    weights_l2 = sum(p.double().square().sum() for p in model.parameters()).item()
    clip = clips.summary() if clips is not None else {}
    return {
        **cell,
        "world_size": world,
        "steps": steps,
        "acc": acc,
        "val_loss": val_loss,
        **precise,
        "train_s": seconds,
        "weights_l2": weights_l2,
        **({"brn_clip": clip} if clip else {}),
    }


def _lr(cell: dict, global_batch: int) -> float:
    """``lr`` at ``ref_batch``, scaled with the square root of the global batch (Adam-type
    optimizers) or linearly (the trainer's rule for SGD)."""
    if cell["lr_scaling"] == "linear":
        return scaled_lr(cell["lr"], cell["ref_batch"], global_batch)
    return cell["lr"] * (global_batch / cell["ref_batch"]) ** 0.5


class _ClipMeter:
    """Batch Renorm's clip diagnostics once its limits are fully open, every 10th step
    (they only read the layers' last r and d: training is unchanged)."""

    def __init__(self, model: nn.Module):
        self.model, self.samples = model, 0
        self.from_step = max(getattr(m, "warmup_steps", 0) for m in model.modules())
        self.sums: dict[str, dict[str, float]] = {k: {} for k in CLIP_STATS}  # stat, layer

    def sample(self, step: int) -> None:
        if step < self.from_step or step % 10:
            return
        for name, stats in renorm_diagnostics(self.model).items():
            for k in CLIP_STATS:
                self.sums[k][name] = self.sums[k].get(name, 0.0) + stats[k]
        self.samples += 1

    def summary(self) -> dict:
        """Per statistic: the mean over layers and sampled steps, and the worst layer."""
        clip = {}
        for k, sums in self.sums.items() if self.samples else ():
            per_layer = [v / self.samples for v in sums.values()]
            clip[k] = statistics.fmean(per_layer)
            clip[f"{k}_worst_layer"] = max(per_layer)
        return clip


def _after_precise_bn(model: nn.Module, data: dict, seed: int, mine: slice, world: int) -> dict:
    """The model's accuracy and loss after precise BN (norms.precise_bn, as the trainer
    runs it): 200 training batches drawn like the training ones, each rank slicing the
    global one.  Empty for a model with no running statistics."""
    if not running_stat_layers(model):
        return {}
    x_train, (x_val, y_val) = data["train"][0], data["val"]
    g = torch.Generator().manual_seed(10_000 + seed)
    n, global_batch = len(x_train), (mine.stop - mine.start) * world
    batches = (x_train[torch.randperm(n, generator=g)[:global_batch][mine]] for _ in range(200))
    precise_bn(model, batches, num_batches=200)
    acc, loss = _evaluate(model, x_val, y_val)
    return {"acc_precise": acc, "val_loss_precise": loss}


def _evaluate(model: nn.Module, x_val, y_val) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x_val[i : i + 256]) for i in range(0, len(x_val), 256)])
    acc = (logits.argmax(1) == y_val).float().mean().item()
    return acc, nn.functional.cross_entropy(logits, y_val).item()


def _single(args: tuple[dict, str]) -> dict:
    torch.set_num_threads(1)
    return train_cell(*args)


def _sync_worker(rank: int, world: int, cell: dict, data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    result = train_cell(cell, data_path, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def run_sync(cell: dict, data_path: str, tmp: Path) -> dict:
    out = tmp / f"sync_{cell['norm']}_{cell['batch']}_{cell['seed']}.json"
    spawn_gloo(_sync_worker, 2, cell, data_path, str(out), timeout=None)
    return json.loads(out.read_text())


# -- main ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test size (~15 s)")
    ap.add_argument("--norms", nargs="+", default=list(DEFAULT_NORMS), choices=NORMS)
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 16, 8, 4, 2])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=24576, help="training samples per run")
    ap.add_argument(
        "--min-steps",
        type=int,
        default=1536,
        help="optimizer steps per run at least (a larger global batch then sees more samples)",
    )
    ap.add_argument("--num-train", type=int, default=1536)
    ap.add_argument("--num-val", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="SmallResNet stage widths")
    ap.add_argument("--name", default="study_cls", help="result file stem (not with --quick)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ref-batch", type=int, default=32)
    ap.add_argument("--lr-scaling", default="sqrt", choices=("sqrt", "linear"))
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--data-root", default=str(ROOT / "data" / "shapes"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument(
        "--render-only",
        nargs="+",
        metavar="STUDY_JSON",
        help="redo the table, plot and wandb run from saved study JSON files (merged, named "
        "after the first; e.g. the default grid plus a --norms syncbrn run); no training",
    )
    return ap


def _checked(ap: argparse.ArgumentParser, args) -> None:
    """--quick sizes, and every numeric argument in range (argparse's error otherwise)."""
    if args.quick:
        args.batches, args.seeds, args.samples = [16, 2], 1, 256
        args.num_train, args.num_val, args.min_steps = 256, 90, 0
    for name in ("seeds", "samples", "num_train", "num_val", "image_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_steps < 0:
        ap.error(f"--min-steps must be >= 0, got {args.min_steps}")
    bad = [b for b in args.batches if b < 1 or 2 * b > args.samples]
    if bad:
        ap.error(f"--batches {bad}: each must be >= 1 and 2 x batch <= --samples")


def _train_missing(store: CellStore, cells: list[dict], data_path: str) -> None:
    """Train the cells the store does not hold yet, storing each as it finishes."""
    todo = [c for c in cells if store.get(c) is None]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {store.folder}", flush=True)
    local = [c for c in todo if c["norm"] not in SYNC]
    # One-process cells run two at a time, one thread each: on 2 cores that is about twice
    # the throughput of one run with two threads at these small batches.
    with mp.get_context("spawn").Pool(2) as pool:
        for r in pool.imap_unordered(_single, [(c, data_path) for c in local]):
            print(_line(store.put(r)), flush=True)
    # Then the 2-process cells, alone: next to the pool (4 busy processes on 2 cores) each
    # gloo collective waits for a descheduled peer and a cell takes ~7x longer.
    with tempfile.TemporaryDirectory() as tmp:
        for c in [c for c in todo if c["norm"] in SYNC]:
            print(_line(store.put(run_sync(c, data_path, Path(tmp)))), flush=True)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.render_only:
        return render([Path(p) for p in args.render_only], Path(args.out), not args.no_wandb)
    _checked(ap, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "study_quick" if args.quick else args.name
    # One file per finished cell, reused when present with the same recipe: a grid that
    # an interruption stops continues where it stopped.
    store = CellStore(out / f"{name}_cells", lambda c: f"{c['norm']}_b{c['batch']}_s{c['seed']}")
    t0 = time.perf_counter()
    data_path = str(
        load_tensors(Path(args.data_root), args.num_train, args.num_val, args.image_size)
    )
    common = recipe_of(
        args, "samples", "min_steps", "optimizer", "lr", "ref_batch", "lr_scaling"
    ) | recipe_of(args, "weight_decay", "num_train", "num_val", "image_size")
    common["widths"] = [int(w) for w in args.widths.split(",")]
    batches = sorted(set(args.batches), reverse=True)
    cells = [
        dict(norm=n, batch=b, seed=s, **common)
        for s in range(args.seeds)
        for b in batches
        for n in args.norms
    ]
    _train_missing(store, cells, data_path)
    # The report covers every stored cell of this recipe, not only this grid's: extra
    # seeds or 2-process lines run by another invocation join it.
    rows = [r for r in store.all(common) if r["norm"] in NORMS]
    meta = dict(
        date=date.today().isoformat(),
        machine=machine(),
        seeds=args.seeds,
        **common,  # the recipe every cell was trained with
        wall_min=(time.perf_counter() - t0) / 60,
        train_min=sum(r["train_s"] for r in rows) / 60,
    )
    report(rows, meta, out, name, not args.no_wandb)
    return 0


def _line(r: dict) -> str:
    return (
        f"{r['norm']:>7} B={r['batch']:<3} seed {r['seed']}: acc {100 * r['acc']:5.1f}%  "
        f"val loss {r['val_loss']:.3f}  "
        f"({r['steps']} steps, {r['train_s']:.0f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())

"""The small-batch study: validation accuracy vs per-device batch for each norm.

    python bench/study.py            # the full grid: 4 norms x 5 batches x 3 seeds (~30 min)
    python bench/study.py --quick    # 2 batch sizes, 1 seed, a few hundred samples (~15 s)

A small ResNet (``SmallResNet``: torchvision BasicBlocks, widths 16-128) is trained on
the embedded shapes classification data at 16 px with each norm at each per-device batch
size.  Why 16 px: at 32 px this 3-class task saturates (every norm at every batch size
reached 99.8-100% on the first seed), which hides any difference.  At 16 px the shapes
are 4-11 px, accuracy stays below 100%, and the last stage is 2 x 2, so a batch of 2
normalizes its deepest layers over 8 values per channel (ResNet-50's last stage at 2
images/GPU: 98), where batch statistics are noisy:

* ``bn``, ``brn``, ``gn`` (+ Weight Standardization) in one process;
* ``syncbn`` with 2 gloo processes over 127.0.0.1, each with the per-device batch, so
  statistics are over 2 x B samples.

Every cell sees the same number of training samples, in the same order for a given seed
(a 2-process step splits the global batch between the ranks), with AdamW, the trainer's
warm-up + cosine schedule, and one learning-rate rule for every cell: ``--lr`` is given
for ``--ref-batch`` and scaled with the square root of the global batch, the rule for
Adam-type optimizers (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive
Gradient Algorithms"; ``--lr-scaling linear`` is Goyal et al.'s rule for SGD, which the
trainer uses).  Why not linear: with AdamW it starves the small batches (B=2 gets 1/16 of
the step size), and the batch-independent GroupNorm line then falls with B too, which
would be read as a normalization effect.  With sqrt scaling the GN line is the control.
Why AdamW: this task has an initial plateau at chance that SGD (lr 0.02-0.1) often does
not leave within the budget, which turns cells into a lottery.

24,576 samples per run (16 epochs of 1,536 images), and at least 1,536 optimizer steps
(``--min-steps``), so B=16 and below see 24,576 samples and B=32 sees 49,152.  Why the
floor: at a fixed sample budget B=32 gets 768 steps, which under-trains the run, and BN
more than GN + WS.  Measured (5 seeds, bench/results/study_cls_b32_budget.md): at 768
steps BN 93.8 ± 2.4% and GN + WS 96.5 ± 0.4%, BN below its own B=16 and B=8 runs (96.5,
97.2, with 1,536 and 3,072 steps); at 1,536 steps BN 98.2 ± 0.6%, GN + WS 98.7 ± 0.5%;
lr 4e-3 at 768 steps lifts BN to 97.3 ± 0.8% and GN + WS to 98.4 ± 0.7%, lr 1e-3 sinks
both (81, 84).  So the B=32 gap was the schedule, not the normalization, and the column
would have shown a BN failure at the batch size where BN is at its best.  Fewer than
~300 steps stay on the plateau at chance (SyncBN at 2 x 32 with 8,192 samples at 32 px:
128 steps, 36%).  A 2-process run of 2 x B has the steps of B' = 2B in one process, so
the lines read from 1-process cells at 2B (see the report) keep the same recipe.
Evaluation is in eval mode, i.e. with the running statistics a deployed model uses,
which is where BatchNorm's small-batch weakness shows; accuracy and the validation
cross-entropy (which still moves when accuracy saturates) are both reported.  Batch
Renorm's clip warm-up takes the first quarter of each run's steps, so its corrections
are fully on for most of it.

The ``auto`` line is what ``norms.select_norm`` picks for one process at each batch size,
read from the measured cells.

Writes ``study.json``, ``study.md`` and ``study.png`` to --out; and, unless --no-wandb,
offline wandb runs (WANDB_MODE decides): a summary run with the table and the plot, and
one run per training run, grouped per cell (``cls_<norm>_b<B>_w<world>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import CellStore, machine  # noqa: E402

# Re-exported: the study's public face is this script.
from study_report import (  # noqa: E402, F401
    CLIP_STATS,
    NORMS,
    render,
    report,
    run_steps,
    schema,
    summarize,
)

from norms import (  # noqa: E402
    convert_convs_to_ws,
    convert_norms,
    precise_bn,
    renorm_diagnostics,
    running_stat_layers,
)
from trainer.data.classification import IndexedImageFolder  # noqa: E402
from trainer.data.shapes import ensure_shapes  # noqa: E402
from trainer.distributed import spawn_gloo  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler, scaled_lr  # noqa: E402

DEFAULT_NORMS = ("bn", "brn", "gn", "syncbn")
WIDTHS = (16, 32, 64, 128, 128)
SYNC = ("syncbn", "syncbrn")  # run on 2 gloo processes


# -- data ------------------------------------------------------------------------------
def load_tensors(root: Path, num_train: int, num_val: int, size: int) -> Path:
    """Shapes classification data as one tensor file (decoded once, shared by workers)."""
    folder = ensure_shapes(root, "classification", num_train, num_val, size)
    cache = folder / "tensors.pt"
    if not cache.is_file():
        blob = {}
        for split in ("train", "val"):
            ds = IndexedImageFolder(folder / split, train=False)
            xs, ys = zip(*[ds[i][:2] for i in range(len(ds))], strict=True)
            blob[split] = (torch.stack(xs), torch.tensor(ys))
        tmp = cache.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    return cache


# -- one training run ------------------------------------------------------------------
class SmallResNet(nn.Sequential):
    """A small ResNet for 16 px inputs: a 3x3 stem, then one torchvision BasicBlock per
    stage at widths 16-32-64-128-128 (1.1 M parameters, 13 norm layers).  Its fifth stage
    works at 1x1, as ResNet-50's last stage does on 32 px inputs (or an MLP head's BN1d):
    there BatchNorm normalizes each channel over just B values, which is where its
    small-batch weakness is unmistakable.  Small enough for the grid on 2 CPU cores."""

    def __init__(self, num_classes: int = 3, widths=(16, 32, 64, 128, 128)):
        from torchvision.models.resnet import BasicBlock

        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(BasicBlock(cin, w, stride, down))
            cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        super().__init__(*layers)


# Batch Renorm variants, as fractions of the run's steps (the layer counts forwards):
# "brn" ramps both limits over the first quarter; "brn_m01" is the same with momentum
# 0.01 (Keras's renorm_momentum=0.99); "brn_paper" is the paper's Inception-v3 shape
# (plain BN for 5k of 40k steps, dmax open by 25k, rmax by 40k), scaled to the run.
BRN_VARIANTS = {
    "brn": dict(momentum=0.1, hold=0.0, r_end=0.25, d_end=0.25),
    "brn_m01": dict(momentum=0.01, hold=0.0, r_end=0.25, d_end=0.25),
    "brn_paper": dict(momentum=0.01, hold=0.125, r_end=1.0, d_end=0.625),
}
BASE_KIND = {"syncbrn": "syncbrn", **{v: "brn" for v in BRN_VARIANTS}}


def build(norm: str, steps: int, widths=WIDTHS) -> nn.Module:
    model = SmallResNet(widths=widths)
    kind = BASE_KIND.get(norm, norm)
    if kind in ("brn", "syncbrn"):
        # SyncBRN trains with the trainer's norm.brn defaults: brn_m01's.
        v = BRN_VARIANTS["brn_m01" if norm == "syncbrn" else norm]
        return convert_norms(
            model,
            kind,
            rmax=3.0,
            dmax=5.0,
            momentum=v["momentum"],
            hold_steps=round(v["hold"] * steps),
            warmup_steps=round(v["r_end"] * steps),
            d_warmup_steps=round(v["d_end"] * steps),
        )
    if kind == "gn":
        # 8 groups divide every width (2-16 channels per group).
        return convert_convs_to_ws(convert_norms(model, "gn", num_groups=8))
    if kind == "syncbn":
        return convert_norms(model, "syncbn")
    return model  # nn.BatchNorm2d


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
    widths = tuple(cell.get("widths", WIDTHS))
    model = build(cell["norm"], steps, widths)
    has_renorm = BASE_KIND.get(cell["norm"]) in ("brn", "syncbrn")
    brn_warmup = max(getattr(m, "warmup_steps", 0) for m in model.modules())
    clip_sums: dict[str, dict[str, float]] = {k: {} for k in CLIP_STATS}  # stat -> layer -> sum
    clip_samples = 0
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cell["lr_scaling"] == "linear":
        lr = scaled_lr(cell["lr"], cell["ref_batch"], batch * world)
    else:
        lr = cell["lr"] * (global_batch / cell["ref_batch"]) ** 0.5
    opt = build_optimizer(model, cell["optimizer"], lr, 0.9, cell["weight_decay"])
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
        # Batch Renorm's clip diagnostics once its limits are fully open, every 10th step
        # (they only read the layers' last r and d: training is unchanged).
        if has_renorm and step >= brn_warmup and step % 10 == 0:
            for name, stats in renorm_diagnostics(model).items():
                for k in CLIP_STATS:
                    clip_sums[k][name] = clip_sums[k].get(name, 0.0) + stats[k]
            clip_samples += 1
    seconds = time.perf_counter() - t0
    acc, val_loss = _evaluate(model, x_val, y_val)  # running statistics, as deployed
    precise = {}
    if running_stat_layers(model):
        # The same model after precise BN (norms.precise_bn, as the trainer runs it):
        # 200 training batches drawn like the training ones (ranks slice the global one).
        g = torch.Generator().manual_seed(10_000 + seed)
        mine = slice(rank * batch, (rank + 1) * batch)
        batches = (x_train[torch.randperm(n, generator=g)[:global_batch][mine]] for _ in range(200))
        precise_bn(model, batches, num_batches=200)
        acc_p, loss_p = _evaluate(model, x_val, y_val)
        precise = {"acc_precise": acc_p, "val_loss_precise": loss_p}
    # A fingerprint of the trained weights (tests compare runs that must agree).
    weights_l2 = sum(p.double().square().sum() for p in model.parameters()).item()
    clip = {}
    if clip_samples:
        for k, sums in clip_sums.items():
            per_layer = [v / clip_samples for v in sums.values()]
            clip[k] = statistics.fmean(per_layer)  # mean over layers and sampled steps
            clip[f"{k}_worst_layer"] = max(per_layer)
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


# -- reporting -------------------------------------------------------------------------
# -- main ------------------------------------------------------------------------------
def main(argv=None) -> int:
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
    args = ap.parse_args(argv)
    if args.render_only:
        return render([Path(p) for p in args.render_only], Path(args.out), not args.no_wandb)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "study_quick" if args.quick else args.name
    batches = sorted(set(args.batches), reverse=True)
    # One file per finished cell, reused when present with the same recipe: a grid that
    # a session's end interrupts continues where it stopped.
    store = CellStore(out / f"{name}_cells", lambda c: f"{c['norm']}_b{c['batch']}_s{c['seed']}")

    t0 = time.perf_counter()
    data_path = str(
        load_tensors(Path(args.data_root), args.num_train, args.num_val, args.image_size)
    )
    common = dict(
        samples=args.samples,
        min_steps=args.min_steps,
        optimizer=args.optimizer,
        lr=args.lr,
        ref_batch=args.ref_batch,
        lr_scaling=args.lr_scaling,
        weight_decay=args.weight_decay,
        widths=[int(w) for w in args.widths.split(",")],
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
    )
    cells = [
        dict(norm=n, batch=b, seed=s, **common)
        for s in range(args.seeds)
        for b in batches
        for n in args.norms
    ]
    rows = [r for c in cells if (r := store.get(c)) is not None]
    todo = [c for c in cells if store.get(c) is None]
    print(f"{len(rows)} of {len(cells)} cells already in {store.folder}", flush=True)
    local = [c for c in todo if c["norm"] not in SYNC]
    # One-process cells run two at a time, one thread each: on 2 cores that is about twice
    # the throughput of one run with two threads at these small batches.
    with mp.get_context("spawn").Pool(2) as pool:
        for r in pool.imap_unordered(_single, [(c, data_path) for c in local]):
            rows.append(store.put(r))
            print(_line(r), flush=True)
    # Then the 2-process cells, alone: next to the pool (4 busy processes on 2 cores) each
    # gloo collective waits for a descheduled peer and a cell takes ~7x longer.
    with tempfile.TemporaryDirectory() as tmp:
        for c in [c for c in todo if c["norm"] in SYNC]:
            rows.append(store.put(run_sync(c, data_path, Path(tmp))))
            print(_line(rows[-1]), flush=True)
    wall = (time.perf_counter() - t0) / 60
    # The report covers every stored cell of this recipe, not only this grid's: extra
    # seeds or 2-process lines run by another invocation (see the README) join it.
    rows = [r for r in store.all(common) if r["norm"] in NORMS]

    meta = dict(
        date=date.today().isoformat(),
        machine=machine(),
        seeds=args.seeds,
        **common,  # the recipe every cell was trained with
        wall_min=wall,
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

"""The detection studies: COCO mAP of an FCOS preset vs per-device batch, per norm.

    python -m bench.study_det                   # the 64-px shapes grid (resumable)
    python -m bench.study_det --preset scenes   # the photo-like scenes grid at its own sizing
    python -m bench.study_det --quick           # 2 batch sizes, 1 seed, a few steps

Every cell is a real run of the trainer (``trainer.loop.train``, in process; the
2-process cells on 2 gloo processes over 127.0.0.1) on an embedded detection set:

* ``shapes`` (``study_det``): the default preset with 64 px images, 1,000 training / 200
  validation images, per-device batch 16..1 (2 processes: 4..1);
* ``scenes`` (``study_scenes``): the scenes preset as it trains (JPEGs of mixed sizes and
  both orientations at its multi-scale sizing), 2,000 / 500 images, batch 8..1 (2
  processes: 2, 1).

Each run sees the same number of training samples (``--samples``: a smaller batch takes
more, smaller steps; warm-up is a tenth of the steps), but never fewer optimizer steps
than the B=8 cell (``--min-steps``, default samples / 8: a step floor, so a larger batch
is not under-trained; a cell records it only where it binds), with the trainer's linear
learning-rate scaling.  With ``--curve-points`` the one-process B=8 cells of seed 0 also
evaluate along the way (no line there runs precise BN, so the extra evals do not change
training): mAP against steps, which shows whether the schedule has converged.

Lines: ``bn``, ``brn`` (the backbone and FPN forced to that kind, Batch Renorm with the
trainer's ``norm.brn`` defaults, which its cells record; the head is the policy's
GroupNorm + WS everywhere), ``gn_ws`` (GroupNorm + Weight Standardization in the backbone
and FPN too), ``auto`` (the policy's choice, precise BN included where it turns it on),
and on 2 processes of B each ``syncbn`` / ``syncbrn`` and ``auto2``, the policy's choice
there (``norm: auto, world: 2`` in the JSON).  The shapes grid's forced lines run without
precise BN; the scenes grid's with the trainer's own rule for it (on below min_batch).

An ``auto`` (``auto2``) cell whose resolved plan (each part's kind, WS and sync group, and
precise BN) is that of a one-process (2-process) line's cell at the same batch and seed
would be the same run, so it is not run again: it takes that cell's numbers and says
which (``same_as``).

Each finished cell is one JSON file in ``<out>/<name>_cells/``, reused when present with
the same recipe.  One-process cells run ``--jobs`` at a time, one thread each.  Writes
``<name>.json`` (the results schema; metric mAP@.5, with mAP@[.5:.95] beside it),
``<name>.md`` and ``<name>.png``; and, unless --no-wandb, one offline wandb run per
training run (WANDB_MODE decides), grouped per cell (``det_<line>_b<B>_w<world>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.common import (
    CellStore,
    machine,
    recipe_of,
)
from bench.stats import run_steps
from bench.study_det_report import AUTO, LINES, SYNC, write
from norms import available_norms, is_renorm_kind
from trainer.config import BatchRenormConfig, load_config
from trainer.distributed import DistEnv, spawn_gloo
from trainer.loop import train
from trainer.plan import plan_run

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A study's data and grid: the config it trains, its results name, and the
    command-line defaults it fills in."""

    config: Path
    name: str  # results: <name>.{json,md,png}, <name>_cells/
    data_root: Path
    batches: tuple[int, ...]
    sync_batches: tuple[int, ...]
    samples: int
    num_train: int
    num_val: int
    image_size: int
    curve_points: int
    # the 64-px grid's anchors: the preset's sizes scaled to its images (image_size // 12
    # at P3), as its cells were trained; the scenes preset trains with its own
    pin_anchors: bool
    # the 64-px grid's forced lines run without precise BN; the scenes grid's lines get
    # the trainer's own treatment of their kind (precise BN on below min_batch), so a
    # line is what a user who picks that kind gets, and the policy's pick is that run
    forced_lines_precise_bn: bool


PRESETS = {
    "shapes": Preset(
        ROOT / "configs/shapes_det.yaml", "study_det", ROOT / "data/shapes",
        (16, 8, 4, 2, 1), (4, 2, 1), 4000, 1000, 200, 64, 0, True, False,
    ),
    "scenes": Preset(
        ROOT / "configs/scenes_det.yaml", "study_scenes", ROOT / "data/scenes",
        (8, 4, 2, 1), (2, 1), 4000, 2000, 500, 320, 4, False, True,
    ),
}  # fmt: skip

OVERRIDES = {  # what each line sets on top of the recipe
    "bn": ["norm.override.backbone=bn", "norm.override.neck=bn", "norm.precise_bn.enabled=false"],
    "brn": [
        "norm.override.backbone=brn",
        "norm.override.neck=brn",
        "norm.precise_bn.enabled=false",
    ],
    "gn_ws": ["norm.override.backbone=gn", "norm.override.neck=gn"],
    "auto": [],
    "auto2": [],
    "syncbn": [
        "norm.override.backbone=syncbn",
        "norm.override.neck=syncbn",
        "norm.precise_bn.enabled=false",
    ],
    "syncbrn": [
        "norm.override.backbone=syncbrn",
        "norm.override.neck=syncbrn",
        "norm.precise_bn.enabled=false",
    ],
}


def _renorm(name: str) -> bool:
    """A line or kind that is Batch Renorm (lines such as gn_ws are not kinds)."""
    return name in available_norms() and is_renorm_kind(name)


def overrides(cell: dict, out_dir: str) -> list[str]:
    world = cell["world"]
    steps = run_steps(cell, cell["batch"] * world)
    preset = PRESETS[cell.get("preset", "shapes")]
    anchors = [max(4, cell["image_size"] // 12) * 2**i for i in range(5)]
    curve = cell.get("curve_points", 0)
    return [
        f"data.root={cell['data_root']}",
        f"data.image_size={cell['image_size']}",
        *([f"model.anchor_sizes={anchors}"] if preset.pin_anchors else []),
        *([f"train.eval_interval={max(1, steps // curve)}"] if curve else []),
        f"data.num_train={cell['num_train']}",
        f"data.num_val={cell['num_val']}",
        "data.num_workers=0",
        # one thread per training process: --jobs one-process cells share the machine
        # (the trainer's auto would give each all of its CPUs: 2 jobs x 2 threads on 2
        # cores ran 3.5x slower per step)
        "run.threads=1",
        f"train.per_device_batch={cell['batch']}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.log_interval={steps}",
        f"checkpoint.interval={steps}",
        "checkpoint.keep=1",
        "wandb.mode=disabled",
        "run.device=cpu",
        f"run.seed={cell['seed']}",
        f"run.output_dir={out_dir}",
        f"run.name={cell['line']}_b{cell['batch']}_s{cell['seed']}",
        *(
            o
            for o in OVERRIDES[cell["line"]]
            if not (preset.forced_lines_precise_bn and o.startswith("norm.precise_bn."))
        ),
    ]


def plan_signature(cell: dict) -> tuple:
    """What a cell trains with, resolved: per part (kind, WS, sync group size), and
    whether precise BN runs.  Two cells with equal signatures (and batch, seed, recipe)
    are the same run."""
    cfg = load_config(PRESETS[cell.get("preset", "shapes")].config, overrides(cell, "unused"))
    plan = plan_run(cfg, cell["world"], "cpu", "gloo")
    parts = tuple((p, c.kind, c.ws, c.sync_group_size) for p, c in sorted(plan.parts.items()))
    return parts, plan.precise.enabled


def run_cell(cell: dict, rank: int = 0, world: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PRESETS[cell.get("preset", "shapes")].config, overrides(cell, tmp))
        env = DistEnv(rank, world, rank, torch.device("cpu"), "gloo", world)
        t0 = time.perf_counter()
        final = train(cfg, env)
        if rank != 0:  # rank 0 reports (only it writes the run folder)
            return {}
        run_dir = Path(tmp) / cfg.run.name
        policy = json.loads((run_dir / "policy.json").read_text())
        evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = {part: p["kind"] for part, p in policy["parts"].items()}
    if cell.get("curve_points"):  # (step, mAP@.5, mAP) at every evaluation
        points = {r["step"]: [r["step"], r["eval"]["mAP50"], r["eval"]["mAP"]] for r in evals
                  if "eval" in r}  # fmt: skip
        cell = {**cell, "curve": sorted(points.values())}
    return {
        **cell,
        "mAP50": final["mAP50"],
        "mAP": final["mAP"],
        "kinds": kinds,
        "ws": {part: p["ws"] for part, p in policy["parts"].items()},
        "precise_bn": policy["precise_bn"]["enabled"],
        "train_s": time.perf_counter() - t0,
    }


def _single(cell: dict) -> dict:
    torch.set_num_threads(1)
    return run_cell(cell)


def _sync_worker(rank: int, world: int, cell: dict, out: str) -> None:
    torch.set_num_threads(1)
    row = run_cell(cell, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def _report(row: dict) -> None:
    print(
        f"{row['line']:>8} B={row['batch']:<3} seed {row['seed']}: mAP@.5 "
        f"{100 * row['mAP50']:.1f}  mAP {100 * row['mAP']:.1f}  ({row['train_s']:.0f} s)",
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="shapes")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lines", nargs="+", default=list(LINES), choices=LINES)
    # the rest default to the preset's values
    ap.add_argument("--batches", nargs="+", type=int)
    ap.add_argument("--sync-batches", nargs="+", type=int)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--min-steps", type=int, help="step floor (default: samples / 8)")
    ap.add_argument("--curve-points", type=int, help="evaluations along the B=8 seed-0 runs")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--num-train", type=int)
    ap.add_argument("--num-val", type=int)
    ap.add_argument("--jobs", type=int, default=2, help="one-process cells run at once")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the JSON and table from the stored cells of this grid; train nothing",
    )
    ap.add_argument("--data-root")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return ap


def _resolve(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The arguments with the preset's defaults (and --quick's) filled in, checked."""
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("batches", "sync_batches", "samples", "num_train", "num_val", "image_size",
                "curve_points", "data_root"):  # fmt: skip
        if getattr(args, key) is None:
            value = getattr(preset, key)
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.quick:
        args.batches, args.sync_batches, args.seeds, args.samples = [8, 2], [2], 1, 16
        args.num_train, args.num_val = 32, 8
        args.curve_points = min(args.curve_points, 2)
    if args.min_steps is None:
        args.min_steps = args.samples // 8  # the B=8 cell's steps
    args.data_root = str(args.data_root)
    if min(args.batches + args.sync_batches) < 1 or args.seeds < 1 or args.samples < 1:
        ap.error("--batches, --sync-batches, --seeds and --samples must be >= 1")
    if args.min_steps < 0 or args.curve_points < 0:
        ap.error("--min-steps and --curve-points must be >= 0")
    return args


def _recipe(args) -> dict:
    recipe = recipe_of(args, "samples", "image_size", "num_train", "num_val", "data_root")
    # the shapes grid's cells predate presets: they record none, so they stay valid
    return recipe if args.preset == "shapes" else {**recipe, "preset": args.preset}


def _cell(args, line: str, b: int, seed: int, brn: dict) -> dict:
    world = 2 if line in SYNC else 1
    cell = dict(line=line, batch=b, world=world, seed=seed, **_recipe(args))
    if run_steps({**cell, "min_steps": args.min_steps}, b * world) > run_steps(cell, b * world):
        cell["min_steps"] = args.min_steps  # recorded only where the floor binds
    if args.curve_points and world == 1 and seed == 0 and b == 8 and line not in AUTO:
        cell["curve_points"] = args.curve_points
    return {**cell, **({"brn": brn} if _renorm(line) else {})}


def _grid(args) -> tuple[list[dict], dict[int, dict]]:
    """The grid's cells, and for each auto cell whose plan is another line's (same
    signature, batch and seed) that line's cell: it is the same run."""
    brn = dataclasses.asdict(BatchRenormConfig())  # recorded: a new default reruns the cells
    cells = [
        _cell(args, line, b, s, brn)
        for s in range(args.seeds)
        for line in args.lines
        for b in (args.sync_batches if line in SYNC else args.batches)
    ]
    same_as = {}
    for c in (c for c in cells if c["line"] in AUTO):
        twins = [o for o in cells if o["line"] in AUTO[c["line"]] and o["batch"] == c["batch"]]
        twins = [o for o in twins if o["seed"] == c["seed"]]
        sig = plan_signature(c)
        if any(_renorm(kind) for _, kind, _, _ in sig[0]):
            c["brn"] = brn  # the policy's Batch Renorm: its settings are the cell's recipe
        match = next((o for o in twins if plan_signature(o) == sig), None)
        if match is not None:
            same_as[id(c)] = match
    return cells, same_as


def _train_missing(store: CellStore, todo: list[dict], jobs: int) -> None:
    """Seed by seed, so a grid cut short by an interruption has every cell at the seeds it
    reached: that seed's one-process cells ``jobs`` at a time (the smallest batch, the
    longest run, first, so the pool's last jobs are short ones), then its 2-process cells
    alone (next to other runs each gloo collective waits for a descheduled peer)."""
    torch.set_num_threads(1)
    with mp.get_context("spawn").Pool(max(1, jobs)) as pool:
        for seed in sorted({c["seed"] for c in todo}):
            single = sorted((c for c in todo if c["seed"] == seed and c["world"] == 1),
                            key=lambda c: c["batch"])  # fmt: skip
            for row in pool.imap_unordered(_single, single):
                _report(store.put(row))
            for c in sorted((c for c in todo if c["seed"] == seed and c["world"] > 1),
                            key=lambda c: c["batch"]):  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    spawn_gloo(_sync_worker, 2, c, f"{tmp}/row.json", timeout=None)
                    _report(store.put(json.loads(Path(f"{tmp}/row.json").read_text())))


def main(argv=None) -> int:
    args = _resolve(_parser(), argv)
    out = Path(args.out)
    name = PRESETS[args.preset].name + ("_quick" if args.quick else "")
    store = CellStore(out / f"{name}_cells", lambda c: f"{c['line']}_b{c['batch']}_s{c['seed']}")
    cells, same_as = _grid(args)
    runs = [c for c in cells if id(c) not in same_as]
    stored = sum(store.get(c) is not None for c in runs)
    print(f"{stored} of {len(runs)} cells already in {store.folder}", flush=True)
    if not args.report_only:
        _train_missing(store, [c for c in runs if store.get(c) is None], args.jobs)
    rows = [r for c in runs if (r := store.get(c)) is not None]
    for c in cells:
        if id(c) in same_as and (twin := store.get(same_as[id(c)])) is not None:
            rows.append({**twin, "line": c["line"], "same_as": twin["line"]})
    meta = dict(
        date=date.today().isoformat(),
        machine=machine(),
        seeds=list(range(args.seeds)),
        train_min=sum(r["train_s"] for r in rows if "same_as" not in r) / 60,
        data=_describe_data(args),
        min_steps=args.min_steps,
        **_recipe(args),
    )
    print(write(rows, meta, out, name, not args.no_wandb))
    return 0


def _describe_data(args) -> str:
    """The data and sizing in words, for the table's and plot's titles."""
    if args.preset == "shapes":
        return f"shapes detection ({args.image_size} px, {args.num_train} train / " \
            f"{args.num_val} val images)"  # fmt: skip
    cfg = load_config(PRESETS[args.preset].config)
    return (
        f"{args.preset} ({args.num_train} train / {args.num_val} val JPEGs, "
        f"{args.image_size // 2}-{args.image_size} px long side, both orientations; trained "
        f"at shorter side {cfg.data.min_size} up to {cfg.data.max_size}, evaluated at "
        f"{cfg.data.sizing().test_size})"
    )


if __name__ == "__main__":
    sys.exit(main())

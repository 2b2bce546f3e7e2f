"""The detection study: COCO mAP of the default FCOS preset vs per-device batch, per norm.

    python -m bench.study_det              # the grid (a few CPU hours; resumable)
    python -m bench.study_det --quick      # 2 batch sizes, 1 seed, a few steps (~2 min)

Every cell is a real run of the trainer (``trainer.loop.train``, in process; the
2-process cells on 2 gloo processes over 127.0.0.1) on the embedded shapes detection
data, the default preset with these changes, to fit the grid on 2 CPU cores: 64 px
images, 1,000 training / 200 validation images, the same number of training samples for
every cell (``--samples``, so a smaller batch takes more, smaller steps; warm-up is a
tenth of the steps), and the trainer's linear learning-rate scaling with the batch.

Lines: ``bn``, ``brn`` (the backbone and FPN forced to that kind, Batch Renorm with the
trainer's ``norm.brn`` defaults, which its cells record; the head is the policy's
GroupNorm + WS everywhere; no precise BN), ``gn_ws`` (GroupNorm + Weight Standardization
in the backbone and FPN too), ``auto`` (the policy's choice, precise BN included where it
turns it on), and on 2 processes of B each ``syncbn`` / ``syncbrn`` (no precise BN) and
``auto2``, the policy's choice there (``norm: auto, world: 2`` in the JSON).

An ``auto`` (``auto2``) cell whose resolved plan (each part's kind, WS and sync group, and
precise BN) is that of a one-process (2-process) line's cell at the same batch and seed
would be the same run, so it is not run again: it takes that cell's numbers and says
which (``same_as``).

Each finished cell is one JSON file in ``<out>/study_det_cells/``, reused when present
with the same recipe.  One-process cells run ``--jobs`` at a time, one thread each.
Writes ``study_det.json`` (the results schema; metric mAP@.5, with mAP@[.5:.95] beside
it), ``study_det.md`` and ``study_det.png``; and, unless --no-wandb, one offline wandb run
per training run (WANDB_MODE decides), grouped per cell (``det_<line>_b<B>_w<world>``).
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
    log_runs_wandb,
    machine,
    recipe_of,
)
from bench.stats import run_steps
from bench.study_det_report import AUTO, LINES, SYNC, markdown, plot, schema, summarize
from norms import available_norms, is_renorm_kind
from trainer.config import BatchRenormConfig, load_config
from trainer.distributed import DistEnv, spawn_gloo
from trainer.loop import train
from trainer.plan import plan_run

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "shapes_det.yaml"

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
    return [
        f"data.root={cell['data_root']}",
        f"data.image_size={cell['image_size']}",
        # the anchors the study's cells were trained with: the preset's sizes scaled to
        # its 64-px images (image_size // 12 at P3), as the models once did implicitly
        f"model.anchor_sizes={[max(4, cell['image_size'] // 12) * 2**i for i in range(5)]}",
        f"data.num_train={cell['num_train']}",
        f"data.num_val={cell['num_val']}",
        "data.num_workers=0",
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
        *OVERRIDES[cell["line"]],
    ]


def plan_signature(cell: dict) -> tuple:
    """What a cell trains with, resolved: per part (kind, WS, sync group size), and
    whether precise BN runs.  Two cells with equal signatures (and batch, seed, recipe)
    are the same run."""
    cfg = load_config(CONFIG, overrides(cell, "unused"))
    plan = plan_run(cfg, cell["world"], "cpu", "gloo")
    parts = tuple((p, c.kind, c.ws, c.sync_group_size) for p, c in sorted(plan.parts.items()))
    return parts, plan.precise.enabled


def run_cell(cell: dict, rank: int = 0, world: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, overrides(cell, tmp))
        env = DistEnv(rank, world, rank, torch.device("cpu"), "gloo", world)
        t0 = time.perf_counter()
        final = train(cfg, env)
        if rank != 0:  # rank 0 reports (only it writes the run folder)
            return {}
        policy = json.loads((Path(tmp) / cfg.run.name / "policy.json").read_text())
    kinds = {part: p["kind"] for part, p in policy["parts"].items()}
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
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lines", nargs="+", default=list(LINES), choices=LINES)
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 8, 4, 2, 1])
    ap.add_argument("--sync-batches", nargs="+", type=int, default=[4, 2, 1])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=1000)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="one-process cells run at once")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the JSON and table from the stored cells of this grid; train nothing",
    )
    ap.add_argument("--data-root", default=str(ROOT / "data" / "shapes"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return ap


def _grid(args) -> tuple[list[dict], dict[int, dict]]:
    """The grid's cells, and for each auto cell whose plan is another line's (same
    signature, batch and seed) that line's cell: it is the same run."""
    recipe = recipe_of(args, "samples", "image_size", "num_train", "num_val", "data_root")
    brn = dataclasses.asdict(BatchRenormConfig())  # recorded: a new default reruns the cells
    cells = [
        dict(
            line=line,
            batch=b,
            world=2 if line in SYNC else 1,
            seed=s,
            **recipe,
            **({"brn": brn} if _renorm(line) else {}),
        )
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
    # One-process cells: smallest batch (the longest runs) first, so the pool's last jobs
    # are short ones.  2-process cells run one at a time, seed by seed, so a grid cut
    # short by an interruption still has every cell at the seeds it reached.
    todo = sorted(todo, key=lambda c: (c["batch"],) if c["world"] == 1 else (c["seed"], c["batch"]))
    with mp.get_context("spawn").Pool(max(1, jobs)) as pool:
        for row in pool.imap_unordered(_single, [c for c in todo if c["world"] == 1]):
            _report(store.put(row))
    # 2-process cells alone: next to other runs each gloo collective waits for a
    # descheduled peer.
    torch.set_num_threads(1)
    for c in (c for c in todo if c["world"] > 1):
        with tempfile.TemporaryDirectory() as tmp:
            spawn_gloo(_sync_worker, 2, c, f"{tmp}/row.json", timeout=None)
            _report(store.put(json.loads(Path(f"{tmp}/row.json").read_text())))


def _write(rows: list[dict], meta: dict, out: Path, name: str, use_wandb: bool) -> str:
    """The JSON, the markdown table and the plot (and the wandb runs); returns the table."""
    summary = summarize(rows)
    record = {**schema(summary), "meta": meta, "runs": rows}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(summary, meta)
    (out / f"{name}.md").write_text(table)
    plot(summary, meta, out / f"{name}.png")
    if use_wandb:
        n = log_runs_wandb(
            [r for r in rows if "same_as" not in r],  # an auto twin is another line's run
            out,
            "normpilot-study",
            group=lambda r: f"det_{r['line']}_b{r['batch']}_w{r['world']}",
            name=lambda r: f"det_{r['line']}_b{r['batch']}_s{r['seed']}",
            results=("mAP50", "mAP", "train_s"),
        )
        print(f"wandb: {n} new runs, grouped per cell, under {out}/wandb")
    return table


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.sync_batches, args.seeds, args.samples = [8, 2], [2], 1, 16
        args.num_train, args.num_val = 32, 8
    if min(args.batches + args.sync_batches) < 1 or args.seeds < 1 or args.samples < 1:
        ap.error("--batches, --sync-batches, --seeds and --samples must be >= 1")
    out = Path(args.out)
    name = "study_det_quick" if args.quick else "study_det"
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
        **recipe_of(args, "samples", "image_size", "num_train", "num_val", "data_root"),
    )
    print(_write(rows, meta, out, name, not args.no_wandb))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The detection study: COCO mAP of the default FCOS preset vs per-device batch, per norm.

    python bench/study_det.py              # the grid (a few CPU hours; resumable)
    python bench/study_det.py --quick      # 2 batch sizes, 1 seed, a few steps (~1 min)

Every cell is a real run of the trainer (``trainer.loop.train``, in process; the
2-process cells on 2 gloo processes over 127.0.0.1) on the embedded shapes detection
data, the default preset with these changes, to fit the grid on 2 CPU cores: 64 px
images, 1,000 training / 200 validation images, the same number of training samples for
every cell (``--samples``, so a smaller batch takes more, smaller steps; warm-up is a
tenth of the steps), and the trainer's linear learning-rate scaling with the batch.

Lines: ``bn``, ``brn`` (the backbone and FPN forced to that kind; the head is the
policy's GroupNorm + WS everywhere; no precise BN), ``gn_ws`` (GroupNorm in the backbone
and FPN too; WS stays on the head's convs), ``auto`` (the policy's choice, precise BN
included where it turns it on), and ``syncbn`` / ``syncbrn`` on 2 processes of B each.
Each finished cell is one JSON file in ``<out>/study_det_cells/``, reused when present
with the same recipe.  Writes ``study_det.json`` (the issue's schema; metric mAP@.5,
with mAP@[.5:.95] beside it) and ``study_det.md``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import CellStore, machine  # noqa: E402

from norms import NormPolicy, select_norm  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import DistEnv, spawn_gloo  # noqa: E402
from trainer.loop import train  # noqa: E402

LINES = ("bn", "brn", "gn_ws", "auto", "syncbn", "syncbrn")
SYNC = ("syncbn", "syncbrn")
OVERRIDES = {  # what each line sets on top of the recipe
    "bn": ["norm.override.backbone=bn", "norm.override.neck=bn", "norm.precise_bn.enabled=false"],
    "brn": [
        "norm.override.backbone=brn",
        "norm.override.neck=brn",
        "norm.precise_bn.enabled=false",
    ],
    "gn_ws": ["norm.override.backbone=gn", "norm.override.neck=gn"],
    "auto": [],
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


def overrides(cell: dict, out_dir: str) -> list[str]:
    world = cell["world"]
    steps = max(1, cell["samples"] // (cell["batch"] * world))
    return [
        f"data.root={cell['data_root']}",
        f"data.image_size={cell['image_size']}",
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


def run_cell(cell: dict, rank: int = 0, world: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "shapes_det.yaml", overrides(cell, tmp))
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
        "precise_bn": policy["precise_bn"]["enabled"],
        "train_s": time.perf_counter() - t0,
    }


def _sync_worker(rank: int, world: int, cell: dict, out: str) -> None:
    torch.set_num_threads(1)
    row = run_cell(cell, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def summarize(rows: list[dict]) -> dict:
    """(line, batch) -> seeds, mAP50 and mAP values (seed order), means and stds."""
    cells: dict[tuple[str, int], dict] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        c = cells.setdefault((r["line"], r["batch"]), {"seeds": [], "map50": [], "map": []})
        c["seeds"].append(r["seed"])
        c["map50"].append(100 * r["mAP50"])
        c["map"].append(100 * r["mAP"])
        # What the backbone (and FPN) trained with; the head is GN + WS in every line.
        c["picked"] = r["kinds"]["backbone"] + ("+precise_bn" if r["precise_bn"] else "")
    for c in cells.values():
        for k in ("map50", "map"):
            c[f"{k}_mean"] = statistics.fmean(c[k])
            c[f"{k}_std"] = statistics.stdev(c[k]) if len(c[k]) > 1 else 0.0
    return cells


def schema(cells: dict) -> dict:
    out = []
    for (line, b), c in sorted(cells.items(), key=lambda kv: (LINES.index(kv[0][0]), -kv[0][1])):
        entry = {
            "norm": line,
            "batch": b,
            "world": 2 if line in SYNC else 1,
            "seeds": c["seeds"],
            "values": c["map50"],
            "values_map_50_95": c["map"],
        }
        if line == "auto":
            entry["picked"] = c["picked"]
        out.append(entry)
    return {"metric": "COCO mAP@.5 (%); values_map_50_95: mAP@[.5:.95] (%)", "cells": out}


def markdown(cells: dict, meta: dict) -> str:
    batches = sorted({b for _, b in cells}, reverse=True)
    lines = [
        f"FCOS ResNet-18 FPN on shapes detection ({meta['image_size']} px, "
        f"{meta['num_train']} train / {meta['num_val']} val images), {meta['samples']} "
        f"training samples per run, mean ± std over seeds {meta['seeds']}. B = per-device "
        f"batch (syncbn/syncbrn: 2 processes x B). {meta['date']}, {meta['machine']}.",
    ]
    for key, title in (("map50", "mAP@.5 (%)"), ("map", "mAP@[.5:.95] (%)")):
        lines += ["", f"{title}:", "", "| line | " + " | ".join(f"B={b}" for b in batches) + " |"]
        lines.append("|" + "---|" * (len(batches) + 1))
        for line in LINES:
            row = []
            for b in batches:
                c = cells.get((line, b))
                if c is None:
                    row.append("–")
                    continue
                text = f"{c[f'{key}_mean']:.1f} ± {c[f'{key}_std']:.1f}"
                row.append(f"{text} ({c['picked']})" if line == "auto" else text)
            lines.append(f"| {line} | " + " | ".join(row) + " |")
    lines += ["", "auto against the best one-process line, mAP@.5, paired by seed:", ""]
    lines += ["| B | auto | best | paired difference | bar | met |", "|---|---|---|---|---|---|"]
    for b in batches:
        if ("auto", b) not in cells:
            continue
        others = [n for n in ("bn", "brn", "gn_ws") if (n, b) in cells]
        if not others:
            continue
        best = max(others, key=lambda n: cells[n, b]["map50_mean"])
        a, c = cells["auto", b], cells[best, b]
        common = sorted(set(a["seeds"]) & set(c["seeds"]))
        d = [a["map50"][a["seeds"].index(s)] - c["map50"][c["seeds"].index(s)] for s in common]
        se = c["map50_std"] / max(1, len(c["map50"])) ** 0.5
        bar = c["map50_mean"] - max(1.0, 2 * se)
        std = statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(
            f"| {b} | {a['map50_mean']:.1f} ({a['picked']}) | {best} {c['map50_mean']:.1f} | "
            f"{statistics.fmean(d):+.1f} ± {std:.1f} | {bar:.1f} | "
            f"{'yes' if a['map50_mean'] >= bar else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
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
    ap.add_argument("--min-batch", type=int, default=16)
    ap.add_argument("--data-root", default=str(ROOT / "data" / "shapes"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.sync_batches, args.seeds, args.samples = [4, 2], [2], 1, 16
        args.num_train, args.num_val = 32, 8
    if min(args.batches + args.sync_batches) < 1 or args.seeds < 1 or args.samples < 1:
        ap.error("--batches, --sync-batches, --seeds and --samples must be >= 1")
    out = Path(args.out)
    name = "study_det_quick" if args.quick else "study_det"
    store = CellStore(out / f"{name}_cells", lambda c: f"{c['line']}_b{c['batch']}_s{c['seed']}")
    recipe = dict(
        samples=args.samples,
        image_size=args.image_size,
        num_train=args.num_train,
        num_val=args.num_val,
        data_root=args.data_root,
    )
    cells = [
        dict(line=line, batch=b, world=2 if line in SYNC else 1, seed=s, **recipe)
        for s in range(args.seeds)
        for line in args.lines
        for b in (args.sync_batches if line in SYNC else args.batches)
        # auto at or above min_batch is bn without precise BN: the bn cell says it.
        if not (line == "auto" and b >= args.min_batch)
    ]
    rows = [r for c in cells if (r := store.get(c)) is not None]
    print(f"{len(rows)} of {len(cells)} cells already in {store.folder}", flush=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for c in cells:
        if store.get(c) is not None:
            continue
        if c["world"] == 1:
            row = run_cell(c)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                spawn_gloo(_sync_worker, 2, c, f"{tmp}/row.json", timeout=None)
                row = json.loads(Path(f"{tmp}/row.json").read_text())
        rows.append(store.put(row))
        print(
            f"{c['line']:>8} B={c['batch']:<3} seed {c['seed']}: mAP@.5 "
            f"{100 * row['mAP50']:.1f}  mAP {100 * row['mAP']:.1f}  ({row['train_s']:.0f} s)",
            flush=True,
        )
    # auto at B >= min_batch: the policy picks BN (without precise BN), i.e. the bn cell.
    for r in [r for r in rows if r["line"] == "bn" and r["batch"] >= args.min_batch]:
        if select_norm(1, r["batch"], policy=NormPolicy(min_batch=args.min_batch)).kind == "bn":
            rows.append({**r, "line": "auto"})
    summary = summarize(rows)
    meta = dict(
        date=date.today().isoformat(), machine=machine(), seeds=list(range(args.seeds)), **recipe
    )
    record = {**schema(summary), "meta": meta, "runs": rows}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(summary, meta)
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

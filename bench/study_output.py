"""Writing the classification study's results: the JSON, the markdown, the plot and the
wandb runs (``report``), and ``render``, which rebuilds them from saved (and merged)
study JSONs."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from bench.common import log_runs_wandb
from bench.study_report import (
    LABELS,
    LINES,
    NORMS,
    _budget,
    _seed_counts,
    markdown,
    plot,
    schema,
    smallest_map,
    summarize,
)
from norms import NormPolicy

__all__ = ["render", "report"]


def log_wandb(
    cells: dict, rows: list[dict], batches: list[int], out: Path, png: Path, meta: dict
) -> str:
    """An offline wandb run (WANDB_MODE decides) with the raw table, the summary plot and
    the PNG; returns the run folder."""
    import wandb

    run = wandb.init(
        project="normpilot-study",
        dir=str(out),
        mode=os.environ.get("WANDB_MODE", "offline"),
        id=f"summary-{uuid.uuid4().hex[:8]}",  # beside the per-run runs (log_runs_wandb)
        name="summary",
        config=meta,
        reinit="finish_previous",
    )
    cols = ["norm", "batch", "seed", "world_size", "steps", "acc", "val_loss", "train_s"]
    run.log({"runs": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    norms = [n for n in LINES if n in cells]
    run.log(
        {
            "accuracy_vs_batch": wandb.plot.line_series(
                xs=batches,
                ys=[
                    [cells[n].get(b, {}).get("mean", float("nan")) for b in batches] for n in norms
                ],
                keys=[LABELS[n] for n in norms],
                title="validation accuracy vs per-device batch",
                xname="per-device batch",
            ),
            "plot": wandb.Image(str(png)),
        }
    )
    folder = run.dir
    run.finish()
    return str(Path(folder).parent)


def report(rows: list[dict], meta: dict, out: Path, name: str, use_wandb: bool) -> None:
    """``name``.json (meta, every run, the summary), .md, .png, and the wandb run."""
    rows = sorted(rows, key=lambda r: (NORMS.index(r["norm"]), -r["batch"], r["seed"]))
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    # The policy as it is now (not as recorded when the cells ran), on this network.
    summary = summarize(rows, batches, NormPolicy(), smallest_map(meta))
    record = {**schema(summary), "meta": meta, "runs": rows, "summary": _jsonable(summary)}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(summary, batches, meta)
    (out / f"{name}.md").write_text(table)
    plot(
        summary,
        batches,
        out / f"{name}.png",
        f"SmallResNet on shapes ({meta['image_size']} px), {_budget(meta, batches, short=True)}, "
        f"{_seed_counts(summary, batches)}; eval with running statistics",
    )
    if use_wandb:
        folder = log_wandb(summary, rows, batches, out, out / f"{name}.png", meta)
        print(f"wandb run: {folder}")
        n = log_runs_wandb(
            rows,
            out,
            "normpilot-study",
            group=lambda r: f"cls_{r['norm']}_b{r['batch']}_w{r['world_size']}",
            name=lambda r: f"cls_{r['norm']}_b{r['batch']}_s{r['seed']}",
            results=("acc", "val_loss", "acc_precise", "val_loss_precise", "train_s"),
        )
        print(f"wandb: {n} new runs, grouped per cell, under {out}/wandb")
    print(table)
    print(f"wrote {out}/{name}.json, .md, .png ({meta['wall_min']:.1f} min of training)")


def render(study_jsons: list[Path], out: Path, use_wandb: bool) -> int:
    saved = [json.loads(p.read_text()) for p in study_jsons]
    meta = dict(saved[0]["meta"])
    for other in saved[1:]:
        m = other["meta"]
        # Merging is only meaningful for runs of the same recipe.
        skip = ("date", "wall_min", "machine", "merged_wall_min")
        differ = [k for k in meta if k not in skip and m.get(k) != meta[k]]
        if differ:
            raise SystemExit(f"{study_jsons[0]} and a merged file differ in {differ}")
        # Keyed by the merged file's norms, so merging the same run again changes nothing.
        norms = ",".join(sorted({r["norm"] for r in other["runs"]}))
        meta["merged_wall_min"] = {**meta.get("merged_wall_min", {}), norms: m["wall_min"]}
    # Keyed by cell, later files winning: re-merging an already merged file adds nothing.
    by_cell = {(r["norm"], r["batch"], r["seed"]): r for s in saved for r in s["runs"]}
    rows = list(by_cell.values())
    out.mkdir(parents=True, exist_ok=True)
    report(rows, meta, out, study_jsons[0].stem, use_wandb)
    return 0


def _jsonable(summary: dict) -> dict:
    return {norm: {str(b): c for b, c in per.items()} for norm, per in summary.items()}

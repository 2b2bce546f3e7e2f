"""Shared by the bench scripts: the machine description, the resumable cell store, the
metric-vs-batch plot and the per-run wandb log of a study."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, cores, torch version (and the GPU, if any): the context of a number."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        desc += f"; {torch.cuda.get_device_name()}"
    return desc


def write_results(out: Path, name: str, rows, caption: str, table: str) -> None:
    """``out/name.json`` (the rows) and ``out/name.md`` (caption, then the table), the
    pair every bench writes; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"{caption}\n\n{table}\n")
    print(table)


def md_table(header: list[str], align: str, rows) -> str:
    """A markdown table: the header, one alignment letter per column (``l`` or ``r``),
    then one row per sequence of cells (already formatted)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join(["| " + " | ".join(header) + " |", rule]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])  # fmt: skip


def recipe_of(args, *keys: str) -> dict:
    """The named command-line values, as the recipe a study records in every cell (a
    changed value re-runs the cells that recorded the old one)."""
    return {k: getattr(args, k) for k in keys}


def sync_device(device) -> None:
    """Wait for queued GPU work before reading a clock (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _matches(row: dict, keys: dict) -> bool:
    return all(row.get(k) == v for k, v in keys.items())


class CellStore:
    """One JSON file per finished study cell, reused when present with the same recipe:
    a grid that is interrupted continues where it stopped."""

    def __init__(self, folder: Path, name):
        self.folder, self.name = Path(folder), name  # name(cell) -> file stem
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cell: dict) -> Path:
        return self.folder / f"{self.name(cell)}.json"

    def get(self, cell: dict) -> dict | None:
        path = self._path(cell)
        if not path.is_file():
            return None
        row = json.loads(path.read_text())
        return row if _matches(row, cell) else None

    def all(self, recipe: dict) -> list[dict]:
        """Every stored cell trained with ``recipe``, whatever grid wrote it."""
        rows = [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]
        return [r for r in rows if _matches(r, recipe)]

    def put(self, row: dict) -> dict:
        path = self._path(row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        os.replace(tmp, path)
        return row


# The auto policy's line in every study plot: drawn wide and pale under the line it
# picked in each cell, so the picks show through.
AUTO_STYLE = dict(color="black", linestyle="--", linewidth=2.5, alpha=0.35)
# ... and its 2-process line (dotted, as every 2-process line is).
AUTO2_STYLE = dict(color="grey", linestyle=":", linewidth=2.5, alpha=0.5)


def plot_vs_batch(panels: list[tuple[str, list]], batches: list[int], path: Path, title: str):
    """One panel per (y label, series); a series is (label, {batch: (mean, std)}, style
    kwargs).  Per-device batch on a log2 x axis, largest first; std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=110)
    for ax, (ylabel, series) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        for label, points, style in series:
            bs = [b for b in batches if b in points]
            ax.errorbar(
                bs,
                [points[b][0] for b in bs],
                yerr=[points[b][1] for b in bs],
                marker="o",
                capsize=3,
                label=label,
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.invert_xaxis()
        ax.set_xlabel("per-device batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    (axes[0] if len(panels) > 1 else axes).legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_runs_wandb(rows: list[dict], out: Path, project: str, group, name, results) -> int:
    """One wandb run per training run of a study, grouped per cell (``group(row)``, e.g.
    "bn_b4": the seeds of a cell side by side), named ``name(row)``, with the run's recipe
    as config and ``results`` (its metric keys) logged and in the summary.  The mode is
    WANDB_MODE's (offline by default; disabled logs nothing).  A run's id derives from the
    row, so a rerun skips the runs already under ``out``/wandb; returns how many it logged."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return 0
    import wandb

    logged = 0
    for row in rows:
        digest = hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:10]
        run_id = f"{name(row)}-{digest}"
        if any((Path(out) / "wandb").glob(f"*-{run_id}")):
            continue
        run = wandb.init(
            project=project,
            dir=str(out),
            mode=mode,
            id=run_id,
            name=name(row),
            group=group(row),
            config={k: v for k, v in row.items() if k not in results},
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),  # one line per study, below
        )
        run.log({k: row[k] for k in results if k in row})
        run.finish()
        logged += 1
    return logged

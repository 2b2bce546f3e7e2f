"""The small-batch study's reports: summary per cell, Markdown tables, the plot, the
wandb run; and ``render``, which rebuilds them from saved (and merged) study JSONs."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from norms import NormPolicy, select_norm

NORMS = ("bn", "brn", "gn", "syncbn", "syncbrn")
LABELS = {
    "bn": "BN",
    "brn": "Batch Renorm",
    "gn": "GN + WS",
    "syncbn": "SyncBN (2 procs)",
    "syncbrn": "SyncBRN (2 procs)",
    "auto": "auto policy (1 proc)",
    "auto2": "auto policy (2 procs)",
}
LINES = (*NORMS, "auto", "auto2")
# Batch Renorm's per-layer diagnostics (norms.batch_renorm renorm_stats) kept per run.
CLIP_STATS = ("r_dev", "r_clipped", "d_abs", "d_clipped")


def summarize(rows: list[dict], batches: list[int], min_batch: int) -> dict:
    cells: dict[str, dict[int, dict]] = {}
    for r in rows:
        c = cells.setdefault(r["norm"], {}).setdefault(r["batch"], {"accs": [], "losses": []})
        c["accs"].append(r["acc"])
        c["losses"].append(r["val_loss"])
        if "brn_clip" in r:
            c.setdefault("clips", []).append(r["brn_clip"])
    for per_batch in cells.values():
        for c in per_batch.values():
            c["mean"] = statistics.fmean(c["accs"])
            c["std"] = statistics.stdev(c["accs"]) if len(c["accs"]) > 1 else 0.0
            c["loss_mean"] = statistics.fmean(c["losses"])
            c["loss_std"] = statistics.stdev(c["losses"]) if len(c["losses"]) > 1 else 0.0
            if c.get("clips"):
                c["clip"] = {k: statistics.fmean(x[k] for x in c["clips"]) for k in c["clips"][0]}
    # The policy's pick at each batch size, for 1 process and for the 2-process cells.
    for line, world in (("auto", 1), ("auto2", 2)):
        auto = {}
        for b in batches:
            kind = select_norm(world, b, policy=NormPolicy(min_batch=min_batch)).kind
            if kind in cells and b in cells[kind]:
                auto[b] = {**cells[kind][b], "kind": kind}
        if auto:
            cells[line] = auto
    return cells


def _table(cells: dict, batches: list[int], fmt) -> list[str]:
    lines = [
        "| norm | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|" + "---|" * (len(batches) + 1),
    ]
    for norm in LINES:
        if norm not in cells:
            continue
        row = []
        for b in batches:
            c = cells[norm].get(b)
            if c is None:
                row.append("–")
                continue
            row.append(f"{fmt(c)} ({c['kind']})" if norm.startswith("auto") else fmt(c))
        lines.append(f"| {LABELS[norm]} | " + " | ".join(row) + " |")
    return lines


def markdown(cells: dict, batches: list[int], meta: dict) -> str:
    lines = [
        f"SmallResNet (ResNet-10, widths 16-128) on shapes classification "
        f"({meta['image_size']} px, {meta['num_train']} train / {meta['num_val']} val images), "
        f"{meta['samples']} training samples per run, {meta['optimizer']} lr {meta['lr']} at "
        f"batch {meta['ref_batch']} with {meta['lr_scaling']} scaling, mean ± std over "
        f"{meta['seeds']} seed(s), evaluated with running statistics. B = per-device batch "
        f"(SyncBN: 2 processes x B). {meta['date']}, {meta['machine']}, "
        f"{meta['wall_min']:.1f} min"
        + "".join(f" + {m:.1f} min ({k})" for k, m in meta.get("merged_wall_min", {}).items())
        + ".",
        "",
        "Validation accuracy (%):",
        "",
        *_table(cells, batches, lambda c: f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"),
        "",
        "Validation cross-entropy:",
        "",
        *_table(cells, batches, lambda c: f"{c['loss_mean']:.3f} ± {c['loss_std']:.3f}"),
    ]
    clipped = [
        (n, b, cells[n][b]["clip"])
        for n in NORMS
        for b in batches
        if "clip" in cells.get(n, {}).get(b, {})
    ]
    if clipped:
        lines += [
            "",
            "Batch Renorm once its limits are fully open (rmax 3, dmax 5): mean over layers and "
            "seeds of every 10th step; the worst layer in brackets. r = sigma_B / sigma_R, "
            "d = (mu_B - mu_R) / sigma_R.",
            "",
            "| norm | B | mean abs(r - 1) | channels with r at its clip | mean abs(d) | "
            "channels with d at its clip |",
            "|---|---|---|---|---|---|",
        ]
        for n, b, c in clipped:
            lines.append(
                f"| {LABELS[n]} | {b} | {c['r_dev']:.3f} ({c['r_dev_worst_layer']:.3f}) | "
                f"{100 * c['r_clipped']:.1f}% ({100 * c['r_clipped_worst_layer']:.1f}%) | "
                f"{c['d_abs']:.3f} ({c['d_abs_worst_layer']:.3f}) | "
                f"{100 * c['d_clipped']:.1f}% ({100 * c['d_clipped_worst_layer']:.1f}%) |"
            )
    return "\n".join(lines) + "\n"


def plot(cells: dict, batches: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    style = {
        "auto": dict(color="black", linestyle="--", linewidth=2.5, alpha=0.35),
        "auto2": dict(color="grey", linestyle=":", linewidth=2.5, alpha=0.5),
    }
    panels = (
        (axes[0], "mean", "std", 100, "validation accuracy (%)"),
        (axes[1], "loss_mean", "loss_std", 1, "validation cross-entropy (lower is better)"),
    )
    for ax, mean_key, std_key, scale, ylabel in panels:
        for norm in LINES:
            if norm not in cells:
                continue
            bs = [b for b in batches if b in cells[norm]]
            ax.errorbar(
                bs,
                [scale * cells[norm][b][mean_key] for b in bs],
                yerr=[scale * cells[norm][b][std_key] for b in bs],
                marker="o",
                capsize=3,
                label=LABELS[norm],
                **style.get(norm, {}),
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.invert_xaxis()
        ax.set_xlabel("per-device batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    summary = summarize(rows, batches, meta["min_batch"])
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "runs": rows, "summary": _jsonable(summary)}, indent=1) + "\n"
    )
    table = markdown(summary, batches, meta)
    (out / f"{name}.md").write_text(table)
    plot(
        summary,
        batches,
        out / f"{name}.png",
        f"SmallResNet on shapes ({meta['image_size']} px), {meta['samples']} samples per run, "
        f"{meta['seeds']} seed(s); eval with running statistics",
    )
    if use_wandb:
        folder = log_wandb(summary, rows, batches, out, out / f"{name}.png", meta)
        print(f"wandb run: {folder}")
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

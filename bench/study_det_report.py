"""The detection studies' report: per (line, batch) the seeds' mAP, the results JSON
schema, the markdown tables (mAP@.5, mAP@[.5:.95], the policy against the best line,
every line against the best one with the standard error of the paired difference, and
mAP against steps where the grid recorded it) and the plot; ``write`` puts them, and
the offline wandb runs, in the results folder."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import AUTO2_STYLE, AUTO_STYLE, log_runs_wandb, plot_vs_batch
from bench.stats import acceptance_bar, mean_std, paired_differences

__all__ = ["AUTO", "LINES", "SYNC", "markdown", "plot", "schema", "summarize", "write"]

LINES = ("bn", "brn", "gn_ws", "auto", "syncbn", "syncbrn", "auto2")
SYNC = ("syncbn", "syncbrn", "auto2")  # the lines run on 2 processes of B each
AUTO = {"auto": ("bn", "brn", "gn_ws"), "auto2": ("syncbn", "syncbrn")}  # vs these lines


def summarize(rows: list[dict]) -> dict:
    """(line, batch) -> seeds, mAP50 and mAP values (seed order), means and stds."""
    cells: dict[tuple[str, int], dict] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        c = cells.setdefault((r["line"], r["batch"]), {"seeds": [], "map50": [], "map": []})
        c["seeds"].append(r["seed"])
        c["map50"].append(100 * r["mAP50"])
        c["map"].append(100 * r["mAP"])
        # What the backbone (and FPN) trained with; the head is GN + WS in every line.
        ws = "+ws" if r.get("ws", {}).get("backbone") else ""
        c["picked"] = r["kinds"]["backbone"] + ws + ("+precise_bn" if r["precise_bn"] else "")
        if r.get("same_as"):
            c["same_as"] = r["same_as"]
        if r.get("curve") and r["seed"] == 0:
            c["curve"] = r["curve"]
    for c in cells.values():
        for k in ("map50", "map"):
            c[f"{k}_mean"], c[f"{k}_std"] = mean_std(c[k])
    return cells


def schema(cells: dict) -> dict:
    out = []
    for (line, b), c in sorted(cells.items(), key=lambda kv: (LINES.index(kv[0][0]), -kv[0][1])):
        entry = {
            "norm": "auto" if line in AUTO else line,
            "batch": b,
            "world": 2 if line in SYNC else 1,
            "seeds": c["seeds"],
            "values": c["map50"],
            "values_map_50_95": c["map"],
        }
        if line in AUTO:
            entry["picked"] = c["picked"]
            if "same_as" in c:
                entry["same_as"] = c["same_as"]
        out.append(entry)
    return {"metric": "COCO mAP@.5 (%); values_map_50_95: mAP@[.5:.95] (%)", "cells": out}


def _budget(meta: dict) -> str:
    floor = meta.get("min_steps")
    return f"{meta['samples']} training samples per run" + (
        f" and at least {floor} optimizer steps (the B=8 cell's)" if floor else ""
    )


def _data(meta: dict) -> str:
    default = (
        f"shapes detection ({meta['image_size']} px, {meta['num_train']} train / "
        f"{meta['num_val']} val images)"
    )
    return meta.get("data", default)


def markdown(cells: dict, meta: dict) -> str:
    batches = sorted({b for _, b in cells}, reverse=True)
    lines = [
        f"FCOS ResNet-18 FPN on {_data(meta)}, {_budget(meta)}, mean ± std over each cell's "
        f"n seeds (of {meta['seeds']}); {meta['train_min']:.0f} min of training summed over "
        f"the runs. B = per-device batch (syncbn/syncbrn/auto2: 2 processes x B). "
        f"{meta['date']}, {meta['machine']}.",
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
                text = f"{c[f'{key}_mean']:.1f} ± {c[f'{key}_std']:.1f} (n={len(c[key])})"
                same = f", = {c['same_as']}" if "same_as" in c else ""
                row.append(f"{text} ({c['picked']}{same})" if line in AUTO else text)
            lines.append(f"| {line} | " + " | ".join(row) + " |")
    lines += [
        "",
        "auto against the best line of as many processes (auto: bn, brn, gn_ws; auto2, the "
        "policy on 2 processes: syncbn, syncbrn), mAP@.5, paired by seed:",
        "",
    ]
    lines += [
        "| line | B | auto | best | paired difference | bar | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for auto, b in ((auto, b) for auto in AUTO for b in batches):
        if (auto, b) not in cells:
            continue
        others = [n for n in AUTO[auto] if (n, b) in cells]
        if not others:
            continue
        best = max(others, key=lambda n: cells[n, b]["map50_mean"])
        a, c = cells[auto, b], cells[best, b]
        d_mean, d_std = mean_std(paired_differences(a["map50"], a["seeds"], c["map50"], c["seeds"]))
        bar = acceptance_bar(c["map50"])
        lines.append(
            f"| {auto} | {b} | {a['map50_mean']:.1f} ({a['picked']}) | {best} "
            f"{c['map50_mean']:.1f} (n={len(c['map50'])}) | "
            f"{d_mean:+.1f} ± {d_std:.1f} | {bar:.1f} | "
            f"{'yes' if a['map50_mean'] >= bar else 'NO'} |"
        )
    return "\n".join(lines + _paired_table(cells, batches) + _curve_table(cells)) + "\n"


def _paired_table(cells: dict, batches: list[int]) -> list[str]:
    """Every line against the best line of its cell (as many processes), mAP@.5 paired by
    seed: mean difference ± its standard error (std / sqrt(n)), n common seeds."""
    out = [
        "",
        "Each line against the best line of as many processes, mAP@.5, paired by seed "
        "(difference ± standard error, n seeds):",
        "",
        "| B | best | " + " | ".join(n for n in LINES if n not in AUTO) + " |",
        "|---|---|" + "---|" * sum(n not in AUTO for n in LINES),
    ]
    for b in batches:
        for group in AUTO.values():
            present = [n for n in group if (n, b) in cells]
            if not present:
                continue
            best = max(present, key=lambda n: cells[n, b]["map50_mean"])
            row = []
            for n in (n for n in LINES if n not in AUTO):
                if n not in present or n == best:
                    row.append("–" if n != best else "best")
                    continue
                a, c = cells[n, b], cells[best, b]
                d = paired_differences(a["map50"], a["seeds"], c["map50"], c["seeds"])
                mean, std = mean_std(d)
                row.append(f"{mean:+.1f} ± {std / max(1, len(d)) ** 0.5:.1f} (n={len(d)})")
            out.append(
                f"| {b} | {best} {cells[best, b]['map50_mean']:.1f} | " + " | ".join(row) + " |"
            )
    return out


def _curve_table(cells: dict) -> list[str]:
    """mAP against optimizer steps for the lines that recorded it (seed 0)."""
    curves = {n: c["curve"] for (n, _b), c in cells.items() if "curve" in c}
    if not curves:
        return []
    batch = next(b for (n, b), c in cells.items() if "curve" in c)
    steps = sorted({p[0] for curve in curves.values() for p in curve})
    out = [
        "",
        f"mAP@.5 (%) against optimizer steps at B={batch}, seed 0 (is the schedule converged?):",
        "",
        "| line | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for n, curve in sorted(curves.items(), key=lambda kv: LINES.index(kv[0])):
        at = {p[0]: p[1] for p in curve}
        out.append(
            f"| {n} | " + " | ".join(f"{100 * at[s]:.1f}" if s in at else "–" for s in steps) + " |"
        )
    return out


LABELS = {
    "bn": "BN",
    "brn": "Batch Renorm",
    "gn_ws": "GN + WS",
    "auto": "auto policy",
    "syncbn": "SyncBN (2 procs x B)",
    "syncbrn": "SyncBRN (2 procs x B)",
    "auto2": "auto policy (2 procs x B)",
}
STYLE = {
    "auto": AUTO_STYLE,
    "syncbn": dict(linestyle=":"),
    "syncbrn": dict(linestyle=":"),
    "auto2": AUTO2_STYLE,
}


def plot(cells: dict, meta: dict, path: Path) -> None:
    batches = sorted({b for _, b in cells}, reverse=True)
    panels = [
        (
            ylabel,
            [
                (
                    LABELS[line],
                    {
                        b: (c[f"{key}_mean"], c[f"{key}_std"])
                        for (n, b), c in cells.items()
                        if n == line
                    },
                    STYLE.get(line, {}),
                )
                for line in LINES
                if any(n == line for n, _ in cells)
            ],
        )
        for key, ylabel in (("map50", "mAP@.5 (%)"), ("map", "mAP@[.5:.95] (%)"))
    ]
    title = (
        f"FCOS ResNet-18 FPN on {_data(meta).split(' (')[0]}, {_budget(meta)},\n"
        f"mean ± std over each cell's seeds (of {meta['seeds']})"
    )
    plot_vs_batch(panels, batches, path, title)


def write(rows: list[dict], meta: dict, out: Path, name: str, use_wandb: bool) -> str:
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

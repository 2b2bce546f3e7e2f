"""The small-batch study's reports: summary per cell, Markdown tables, the plot, the
wandb run; and ``render``, which rebuilds them from saved (and merged) study JSONs."""

from __future__ import annotations

import json
import os
import statistics
import uuid
from pathlib import Path

from common import AUTO2_STYLE, AUTO_STYLE, log_runs_wandb, plot_vs_batch

from norms import NormPolicy, select_norm

NORMS = ("bn", "brn", "brn_m01", "brn_paper", "gn", "syncbn", "syncbrn")
LABELS = {
    "bn": "BN",
    "brn": "Batch Renorm",
    "brn_m01": "Batch Renorm, momentum 0.01",
    "brn_paper": "Batch Renorm, paper's schedule",
    "gn": "GN + WS",
    "syncbn": "SyncBN (2 procs)",
    "syncbrn": "SyncBRN (2 procs)",
    "gn2": "GN + WS (2 procs)",
    "auto": "auto policy (1 proc)",
    "auto2": "auto policy (2 procs)",
}
LINES = (*NORMS, "gn2", *(f"{n}+pbn" for n in NORMS), "auto", "auto2")
LABELS.update({f"{n}+pbn": f"{LABELS[n]} + precise BN" for n in NORMS})
# Line names in the JSON schema (study_cls.json): gn is GroupNorm + WS, and the
# 2-process policy line is "auto" at world 2.
SCHEMA_NORM = {"gn": "gn_ws", "gn2": "gn_ws", "auto2": "auto"}
TWO_PROCESS = ("syncbn", "syncbrn", "gn2", "auto2")


def world_of(line: str) -> int:
    """Processes behind a line's cells: 2 for the 2-process lines and their precise-BN
    twins ("syncbn+pbn"), 1 for the rest."""
    return 2 if line.split("+")[0] in TWO_PROCESS else 1


# 2-process line -> the 1-process line whose cell at 2B is the same training run.
# SyncBRN trains with the trainer's norm.brn defaults, which are brn_m01's.
TWIN = {"syncbn": "bn", "syncbrn": "brn_m01", "gn2": "gn"}
# The line that trains what the policy's kind means in the trainer (its norm.brn defaults
# are brn_m01's: momentum 0.01, limits open over the first quarter).
AUTO_LINE = {"brn": "brn_m01"}
# Batch Renorm's per-layer diagnostics (norms.batch_renorm renorm_stats) kept per run.
CLIP_STATS = ("r_dev", "r_clipped", "d_abs", "d_clipped")


def summarize(rows: list[dict], batches: list[int], policy: NormPolicy, spatial: int) -> dict:
    """Per line and batch: the seeds' values and their mean and std; the derived
    2-process lines; and the policy's lines, as ``select_norm`` decides with ``policy``
    for a network whose smallest normalized map has ``spatial`` (H x W) values."""
    cells: dict[str, dict[int, dict]] = {}
    by_cell: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        by_cell.setdefault((r["norm"], r["batch"]), []).append(r)
    for r in sorted(rows, key=lambda r: r["seed"]):
        c = cells.setdefault(r["norm"], {}).setdefault(
            r["batch"], {"accs": [], "losses": [], "seeds": []}
        )
        c["accs"].append(r["acc"])
        c["losses"].append(r["val_loss"])
        c["seeds"].append(r["seed"])
        if "brn_clip" in r:
            c.setdefault("clips", []).append(r["brn_clip"])
    # The same runs after precise BN (norms.precise_bn), where they measured it.
    for (norm, b), picked in by_cell.items():
        if all("acc_precise" in r for r in picked):
            cells.setdefault(f"{norm}+pbn", {})[b] = _precise(picked)
    for per_batch in cells.values():
        for c in per_batch.values():
            if "mean" in c:
                continue
            c["mean"] = statistics.fmean(c["accs"])
            c["std"] = statistics.stdev(c["accs"]) if len(c["accs"]) > 1 else 0.0
            c["loss_mean"] = statistics.fmean(c["losses"])
            c["loss_std"] = statistics.stdev(c["losses"]) if len(c["losses"]) > 1 else 0.0
            if c.get("clips"):
                c["clip"] = {k: statistics.fmean(x[k] for x in c["clips"]) for k in c["clips"][0]}
    # A 2-process cell of B trains exactly like the 1-process cell of 2B: the same samples
    # per step (a 2-process step slices the 1-process one, flips included), the same
    # initial weights, DDP's mean gradient is the 2B batch's, and SyncBN / SyncBRN / GN
    # normalize over the same 2B samples (tests/bench/test_study.py checks the weights
    # agree).  So where a 2-process line was not run, it is read from the 1-process
    # cell at 2B, marked "same_as".
    for two, one in TWIN.items():
        for suffix in ("", "+pbn"):
            src, dst = cells.get(one + suffix, {}), cells.setdefault(two + suffix, {})
            for b in batches:
                if b not in dst and 2 * b in src:
                    dst[b] = {**src[2 * b], "same_as": f"{one}{suffix}, 1 process, B={2 * b}"}
            if not dst:
                del cells[two + suffix]
    # The policy's pick at each batch size, for 1 process and for the 2-process cells,
    # with precise BN where the policy turns it on (a BatchNorm-family kind below
    # min_batch) and the runs measured it.
    for line, world in (("auto", 1), ("auto2", 2)):
        auto = {}
        for b in batches:
            kind = select_norm(world, b, policy=policy, spatial=spatial).kind
            src = "gn2" if world == 2 and kind == "gn" else AUTO_LINE.get(kind, kind)
            if src not in cells or b not in cells[src]:
                continue
            if world == 2 and src not in TWO_PROCESS:
                continue  # local BN on 2 processes: no 2-process cell measured it
            precise = b < policy.min_batch and b in cells.get(f"{src}+pbn", {})
            if precise:
                auto[b] = {**cells[f"{src}+pbn"][b], "kind": kind, "precise": True}
            else:
                auto[b] = {**cells[src][b], "kind": kind, "precise": False}
        if auto:
            cells[line] = auto
    return cells


def smallest_map(meta: dict) -> int:
    """H x W of SmallResNet's last stage: the stem keeps the input size and every stage
    after the first halves it."""
    side = -(-meta["image_size"] // 2 ** (len(meta["widths"]) - 1))
    return side * side


def _precise(runs: list[dict]) -> dict:
    accs, losses = [r["acc_precise"] for r in runs], [r["val_loss_precise"] for r in runs]
    return {**_stats(accs, losses), "seeds": [r["seed"] for r in runs]}


def _stats(accs: list[float], losses: list[float]) -> dict:
    return {
        "accs": accs,
        "losses": losses,
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "loss_mean": statistics.fmean(losses),
        "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
    }


def schema(cells: dict) -> dict:
    """The issue's result schema: one entry per (line, batch, world), values per seed."""
    out = []
    for line in LINES:
        for b, c in sorted(cells.get(line, {}).items(), reverse=True):
            entry = {
                "norm": SCHEMA_NORM.get(line, line),
                "batch": b,
                "world": world_of(line),
                "seeds": c["seeds"],
                "values": [100 * a for a in c["accs"]],
            }
            if "same_as" in c:
                entry["same_as"] = c["same_as"]
            if line.startswith("auto"):
                kind = "gn" if c["kind"] == "gn2" else c["kind"]
                entry["picked"] = kind + ("+precise_bn" if c["precise"] else "")
            out.append(entry)
    return {"metric": "validation accuracy (%), eval with running statistics", "cells": out}


def paired_to_best(cells: dict, batches: list[int]) -> list[str]:
    """auto against the best line at each (batch, world), paired by seed: the mean and
    std of per-seed differences (a common seed means the same initial weights and data
    order), and the bar auto must clear: best - max(1 point, 2 standard errors)."""
    lines = [
        "| policy | B | auto (picked) | best line | paired difference (points) | bar | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for auto, world in (("auto", 1), ("auto2", 2)):
        for b in batches:
            if b not in cells.get(auto, {}):
                continue
            candidates = [
                n
                for n in LINES
                if not n.startswith("auto") and world_of(n) == world and b in cells.get(n, {})
            ]
            best = max(candidates, key=lambda n: cells[n][b]["mean"])
            a, c = cells[auto][b], cells[best][b]
            common = sorted(set(a["seeds"]) & set(c["seeds"]))
            diffs = [
                100 * (a["accs"][a["seeds"].index(s)] - c["accs"][c["seeds"].index(s)])
                for s in common
            ]
            mean = statistics.fmean(diffs) if diffs else float("nan")
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            se = 100 * c["std"] / max(1, len(c["accs"])) ** 0.5
            bar = 100 * c["mean"] - max(1.0, 2 * se)
            met = 100 * a["mean"] >= bar
            kind = "gn" if a["kind"] == "gn2" else a["kind"]
            lines.append(
                f"| {LABELS[auto]} | {b} | {100 * a['mean']:.1f} ({kind}"
                f"{' + precise BN' if a['precise'] else ''}) | {LABELS[best]} "
                f"{100 * c['mean']:.1f} | {mean:+.1f} ± {std:.1f} (n={len(diffs)}) | "
                f"{bar:.1f} | {'yes' if met else 'NO'} |"
            )
    return lines


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
            mark = " *" if "same_as" in c else ""
            if norm.startswith("auto"):
                kind = "gn" if c["kind"] == "gn2" else c["kind"]
                row.append(f"{fmt(c)}{mark} ({kind}{' + precise BN' if c['precise'] else ''})")
            else:
                row.append(fmt(c) + mark)
        lines.append(f"| {LABELS[norm]} | " + " | ".join(row) + " |")
    return lines


def run_steps(recipe: dict, global_batch: int) -> int:
    """Optimizer steps of a run: the recipe's sample budget, but never fewer than its
    min_steps (why: bench/study.py's docstring; recipes from before the floor have none)."""
    return max(recipe["samples"] // global_batch, recipe.get("min_steps", 0))


def _budget(meta: dict, batches: list[int], short: bool = False) -> str:
    """The training budget in words: samples per run, and the step floor where it binds
    (the 1-process runs whose steps exceed samples // B)."""
    samples, floor = meta["samples"], meta.get("min_steps", 0)
    raised = [b for b in batches if run_steps(meta, b) > samples // b]
    if not raised:
        return f"{samples} {'' if short else 'training '}samples per run"
    if short:
        return f"{samples} samples per run, >= {floor} steps"
    return (
        f"{samples} training samples per run and at least {floor} optimizer steps (so "
        + ", ".join(f"B={b} sees {floor * b}" for b in raised)
        + "; bench/results/study_cls_b32_budget.md says why)"
    )


def markdown(cells: dict, batches: list[int], meta: dict) -> str:
    lines = [
        f"SmallResNet (widths {'-'.join(map(str, meta.get('widths', (16, 32, 64, 128))))}) "
        f"on shapes classification "
        f"({meta['image_size']} px, {meta['num_train']} train / {meta['num_val']} val images), "
        f"{_budget(meta, batches)}, {meta['optimizer']} lr {meta['lr']} at "
        f"batch {meta['ref_batch']} with {meta['lr_scaling']} scaling, mean ± std over "
        f"{_seed_counts(cells, batches)}, evaluated with running statistics. B = per-device "
        f"batch (2 procs: 2 processes x B). {meta['date']}, {meta['machine']}; "
        f"{meta['wall_min']:.1f} min for this invocation"
        + "".join(f" + {m:.1f} min ({k})" for k, m in meta.get("merged_wall_min", {}).items())
        + (
            f", {meta['train_min']:.0f} min of training summed over all cells"
            if "train_min" in meta
            else ""
        )
        + ".",
        "",
        "Validation accuracy (%):",
        "",
        *_table(cells, batches, lambda c: f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"),
        "",
        "\\* a 2-process cell of B read from the 1-process cell of 2B: the same training in "
        "exact arithmetic (same samples per step, initial weights and mean gradient; SyncBN, "
        "SyncBRN and GN normalize the same 2B samples; tests/bench/test_study.py checks the "
        "weights agree after a few steps). Over a full run the two processes' different "
        "summation order grows into a difference like another seed's (measured once: SyncBN "
        "2 x 4, seed 0, 95.2% against BN at 8, 97.2%), so these lines carry the 1-process "
        "cells' spread, not their own.",
        "",
        "Validation cross-entropy:",
        "",
        *_table(cells, batches, lambda c: f"{c['loss_mean']:.3f} ± {c['loss_std']:.3f}"),
        "",
        "The policy against the best line in each cell:",
        "",
        *paired_to_best(cells, batches),
    ]
    clipped = [
        (n, b, cells[n][b]["clip"])
        for n in NORMS
        for b in batches
        if "clip" in cells.get(n, {}).get(b, {}) and "same_as" not in cells[n][b]
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


def _seed_counts(cells: dict, batches: list[int]) -> str:
    """How many seeds the measured cells have, e.g. "5 seeds (3 at B=4, 2)"."""
    counts: dict[int, set[int]] = {}
    for norm in NORMS:
        for b, c in cells.get(norm, {}).items():
            counts.setdefault(len(c["seeds"]), set()).add(b)
    if not counts:
        return "0 seeds"
    most = max(counts)
    text = f"{most} seed{'s' if most > 1 else ''}"
    fewer = [
        f"{n} at some lines' B={', '.join(map(str, sorted(bs, reverse=True)))}"
        for n, bs in sorted(counts.items(), reverse=True)
        if n != most
    ]
    return text + (f" ({'; '.join(fewer)})" if fewer else "")


def plot(cells: dict, batches: list[int], path: Path, title: str) -> None:
    style = {
        "auto": AUTO_STYLE,
        "auto2": AUTO2_STYLE,
    }
    panels = []
    for mean_key, std_key, scale, ylabel in (
        ("mean", "std", 100, "validation accuracy (%)"),
        ("loss_mean", "loss_std", 1, "validation cross-entropy (lower is better)"),
    ):
        series = [
            (
                LABELS[norm],
                {b: (scale * c[mean_key], scale * c[std_key]) for b, c in cells[norm].items()},
                style.get(norm, {}),
            )
            for norm in LINES
            if norm in cells
        ]
        panels.append((ylabel, series))
    plot_vs_batch(panels, batches, path, title)


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

"""The classification study's report: the summary per cell (with the 2-process lines read
from their 1-process twins and the policy's lines), the results schema, the markdown
tables and the plot.  bench/study_output.py writes them."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import AUTO2_STYLE, AUTO_STYLE, plot_vs_batch
from bench.stats import acceptance_bar, mean_std, paired_differences, run_steps
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
# Line names in the results JSON schema (study_cls.json): gn is GroupNorm + WS, and the
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
            c["mean"], c["std"] = mean_std(c["accs"])
            c["loss_mean"], c["loss_std"] = mean_std(c["losses"])
            if c.get("clips"):
                c["clip"] = {k: statistics.fmean(x[k] for x in c["clips"]) for k in c["clips"][0]}
    _read_two_process_from_twins(cells, batches)
    _policy_lines(cells, batches, policy, spatial)
    return cells


def _read_two_process_from_twins(cells: dict, batches: list[int]) -> None:
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


def _policy_lines(cells: dict, batches: list[int], policy: NormPolicy, spatial: int) -> None:
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


def smallest_map(meta: dict) -> int:
    """H x W of SmallResNet's last stage: the stem keeps the input size and every stage
    after the first halves it."""
    side = -(-meta["image_size"] // 2 ** (len(meta["widths"]) - 1))
    return side * side


def _precise(runs: list[dict]) -> dict:
    accs, losses = [r["acc_precise"] for r in runs], [r["val_loss_precise"] for r in runs]
    return {**_stats(accs, losses), "seeds": [r["seed"] for r in runs]}


def _stats(accs: list[float], losses: list[float]) -> dict:
    (mean, std), (loss_mean, loss_std) = mean_std(accs), mean_std(losses)
    return {
        "accs": accs,
        "losses": losses,
        "mean": mean,
        "std": std,
        "loss_mean": loss_mean,
        "loss_std": loss_std,
    }


def schema(cells: dict) -> dict:
    """The results schema: one entry per (line, batch, world), values per seed."""
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
            pct = lambda accs: [100 * x for x in accs]  # noqa: E731
            diffs = paired_differences(pct(a["accs"]), a["seeds"], pct(c["accs"]), c["seeds"])
            mean, std = mean_std(diffs) if diffs else (float("nan"), 0.0)
            bar = acceptance_bar(pct(c["accs"]))
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
    return "\n".join(lines + _clip_table(cells, batches)) + "\n"


def _clip_table(cells: dict, batches: list[int]) -> list[str]:
    """Batch Renorm's clip diagnostics per measured cell (none: no lines)."""
    clipped = [
        (n, b, cells[n][b]["clip"])
        for n in NORMS
        for b in batches
        if "clip" in cells.get(n, {}).get(b, {}) and "same_as" not in cells[n][b]
    ]
    if not clipped:
        return []
    lines = [
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
    return lines


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

"""The GPU acceptance run: every CUDA test and every GPU target, in one bounded command.

    make gpu-check                        # on a machine with one CUDA GPU (<= 8 minutes)
    GPU_CHECK_DRY=1 python -m bench.gpu_check --out /tmp/x   # the same script on a CPU

Steps, each with its own time limit so the whole stays under ``--budget`` seconds:

1. ``pytest -m cuda``: the CUDA tests (graphed against eager, the native Batch Renorm,
   sync layers with CUDA tensors on gloo, ...).  A failure makes the exit status 1.
2. Targets, each a ratio of medians timed side by side in this process (round-robin
   blocks, ``bench.models.measure`` / ``bench.layers.interleaved``):

   * graphed ResNet-50 training step at batch 4 against eager: >= 4x faster;
   * graphed Batch Renorm step against graphed BN: <= 1.10x;
   * eager Batch Renorm step against eager BN: <= 1.5x, and per layer <= 1.5x;
   * WSConv2d against nn.Conv2d: <= 1.10x;
   * the trainer's step against a hand-written loop: <= 1.05x.

Writes ``<out>/gpu_check.json`` and ``.md`` (``gpu_check_dry.*`` in a dry run): each
target with its measured ratio and pass/fail (``skipped`` without a GPU), the tests'
counts, the device, torch, CUDA and date.  Needs one GPU, installs nothing and reaches no
network; on a machine without omegaconf/pycocotools/wandb, ``make gpu-wheels`` (here)
fetches wheels that ``make gpu-check`` (there) installs from the repository folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# (name, what, bar, how the ratio compares to the bar)
TARGETS = [
    ("graphed_speedup", "graphed ResNet-50 step at batch 4, eager / graphed", 4.0, ">="),
    ("graphed_brn_vs_bn", "graphed Batch Renorm step / graphed BN step", 1.10, "<="),
    ("eager_brn_vs_bn", "eager Batch Renorm step / eager BN step", 1.5, "<="),
    ("layer_brn_vs_bn", "Batch Renorm layer / BatchNorm2d layer, eager", 1.5, "<="),
    ("wsconv_vs_conv", "WSConv2d / nn.Conv2d", 1.10, "<="),
    ("trainer_vs_hand", "trainer's step / hand-written loop (ResNet-50, BN)", 1.05, "<="),
]


def run_cuda_tests(timeout: float) -> dict:
    """``pytest -m cuda`` in a subprocess: passed/failed/skipped counts and the tail."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", str(ROOT / "tests")]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}\ntimed out after {timeout:.0f} s", -1
    counts = {
        k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", out)) else 0
        for k in ("passed", "failed", "skipped", "error")
    }
    ok = code in (0, 5) and counts["failed"] == 0 and counts["error"] == 0  # 5: none ran
    return {**counts, "ok": ok, "returncode": code, "tail": out[-2000:]}


def _step_ratios(repeats: int) -> dict[str, float]:
    """ResNet-50 at 224 px, batch 4, fp32: eager and graphed steps with BN and ramping
    Batch Renorm, and the hand loop, timed round-robin."""
    from bench.models import FULL, _batch, _hand_step, _training, measure
    from trainer.step import train_step

    _, arch, size, batch = FULL[0]
    data = _batch(arch, size, batch, "cuda")
    runs = {
        (kind, mode): _training(arch, kind, size, batch, "cuda", None, mode, "inductor")
        for kind in ("bn", "brn")
        for mode in ("eager", "graphed")
    }
    steps = {f"{k}_{m}": (lambda t=t: train_step(t, [data])) for (k, m), t in runs.items()}
    steps["hand"] = lambda: _hand_step(runs["bn", "eager"], data)
    ms = measure(steps, "cuda", repeats, block=5)
    return {
        "graphed_speedup": ms["bn_eager"] / ms["bn_graphed"],
        "graphed_brn_vs_bn": ms["brn_graphed"] / ms["bn_graphed"],
        "eager_brn_vs_bn": ms["brn_eager"] / ms["bn_eager"],
        "trainer_vs_hand": ms["bn_eager"] / ms["hand"],
    }


def _layer_ratios(repeats: int) -> dict[str, float]:
    from torch import nn

    from bench.layers import CONV_SHAPE, SHAPES, interleaved
    from norms import BatchRenorm2d, WSConv2d

    shape = SHAPES[0]
    brn = interleaved(
        {"bn": nn.BatchNorm2d(shape[1]), "brn": BatchRenorm2d(shape[1])}, shape, "cuda", repeats
    )
    c = CONV_SHAPE[1]
    conv = interleaved(
        {"conv": nn.Conv2d(c, c, 3, padding=1), "ws": WSConv2d(c, c, 3, padding=1)},
        CONV_SHAPE, "cuda", repeats,
    )  # fmt: skip
    return {"layer_brn_vs_bn": brn["brn"] / brn["bn"], "wsconv_vs_conv": conv["ws"] / conv["conv"]}


def measure_targets(repeats: int) -> tuple[dict[str, float], str | None]:
    """The measured ratios, or ({}, why) when they cannot be measured here."""
    if not torch.cuda.is_available():
        return {}, "no CUDA device"
    return {**_step_ratios(repeats), **_layer_ratios(repeats * 3)}, None


def verdicts(ratios: dict[str, float], skipped: str | None) -> list[dict]:
    rows = []
    for name, what, bar, op in TARGETS:
        value = ratios.get(name)
        if value is None:
            status = f"skipped ({skipped or 'not measured'})"
        else:
            status = "pass" if (value >= bar if op == ">=" else value <= bar) else "FAIL"
        rows.append(dict(target=name, what=what, bar=f"{op} {bar:g}", ratio=value, status=status))
    return rows


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": date.today().isoformat(),
    }


def markdown(record: dict) -> str:
    env, tests = record["environment"], record["cuda_tests"]
    lines = [
        f"GPU check, {env['date']}: {env['device']}, torch {env['torch']}, CUDA {env['cuda']} "
        f"(bench/gpu_check.py, {record['seconds']:.0f} s).",
        "",
        f"CUDA tests (`pytest -m cuda`): {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['skipped']} skipped, {tests['error']} errors.",
        "",
        "| target | measured | bar | status |",
        "|---|---:|---|---|",
    ]
    for r in record["targets"]:
        measured = "–" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['what']} | {measured} | {r['bar']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    if dry:  # the same script end to end; every CUDA part reports itself skipped
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    tests = run_cuda_tests(timeout=args.budget * 0.6)
    ratios, skipped = ({}, "dry run") if dry else measure_targets(args.repeats)
    record = {
        "environment": environment(),
        "cuda_tests": tests,
        "targets": verdicts(ratios, skipped),
        "seconds": time.perf_counter() - start,
        "dry_run": dry,
    }
    name = "gpu_check_dry" if dry else "gpu_check"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record)
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return 0 if tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training images/s of the default preset with ``run.threads=auto`` against torch's
default intra-op threads (every CPU), on 1 process and on 2 (torchrun, gloo), side by side.

    python -m bench.threads            # writes bench/results/threads.{json,md}
    python -m bench.threads --quick    # 6 steps a cell (make test)

Each cell is a real ``normpilot train`` of the default config (configs/shapes_det.yaml)
on a small generated set, so loader workers compete for the cores as they do in a run;
images/s is the last log row's (steps after the first log point).  One file per cell in
bench/results/threads_cells/, reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _cell(procs: int, threads: str, steps: int, data: Path, out: Path) -> float:
    cpus = len(os.sched_getaffinity(0))
    # torch's default: every CPU per process (torchrun would set OMP_NUM_THREADS=1 itself)
    setting = str(cpus) if threads == "default" else "auto"
    args = [
        "train",
        "--config",
        str(ROOT / "configs/shapes_det.yaml"),
        f"run.output_dir={out}",
        f"run.name=p{procs}_{threads}",
        "run.device=cpu",
        f"run.threads={setting}",
        f"data.root={data}",
        "data.num_train=200",
        "data.num_val=8",
        f"train.max_steps={steps}",
        f"train.log_interval={steps // 2}",
        f"checkpoint.interval={steps * 10}",
        "norm.precise_bn.enabled=false",
        "wandb.mode=disabled",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if procs == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        from trainer.distributed import free_port

        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={procs}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "-m",
            "trainer",
            *args,
        ]
        env["OMP_NUM_THREADS"] = setting if threads == "default" else ""
        if not env["OMP_NUM_THREADS"]:
            del env["OMP_NUM_THREADS"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rows = (out / f"p{procs}_{threads}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows if "images_per_s" in r][-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    steps = 6 if a.quick else a.steps
    name = "threads_quick" if a.quick else "threads"
    cells = a.out / f"{name}_cells"
    cells.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            for threads in ("default", "auto"):
                f = cells / f"p{procs}_{threads}_s{steps}.json"
                if not f.exists():
                    ips = _cell(procs, threads, steps, Path(tmp) / "data", Path(tmp) / "runs")
                    cpus = len(os.sched_getaffinity(0))
                    f.write_text(
                        json.dumps(
                            {
                                "procs": procs,
                                "threads": threads,
                                "cpus": cpus,
                                "steps": steps,
                                "images_per_s": ips,
                            }
                        )
                        + "\n"
                    )
                results.append(json.loads(f.read_text()))
    lines = [
        "| processes | torch default img/s | run.threads=auto img/s | auto / default |",
        "|---|---|---|---|",
    ]
    for procs in (1, 2):
        d, t = (
            next(r for r in results if r["procs"] == procs and r["threads"] == k)
            for k in ("default", "auto")
        )
        lines.append(
            f"| {procs} | {d['images_per_s']:.1f} | {t['images_per_s']:.1f} | "
            f"{t['images_per_s'] / d['images_per_s']:.2f} |"
        )
    caption = f"Default preset, {steps} steps a cell, {results[0]['cpus']} CPUs (bench/threads.py)"
    write_results(a.out, name, results, caption, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Training images/s of the default preset with ``run.threads=auto`` against torch's
default intra-op threads (every CPU) and against 1 thread, on 1 process and on 2
(torchrun, gloo), side by side.

    python -m bench.threads            # writes bench/results/threads.{json,md}
    python -m bench.threads --quick    # 6 steps a cell, one round (a smoke run)

Each cell is a real ``normpilot train`` of the default config (configs/shapes_det.yaml)
on a small generated set, so loader workers compete for the cores as they do in a run;
images/s is the last log row's (steps after the first log point).  One file per cell in
bench/results/threads_cells/, reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


SETTINGS = {  # name -> run.threads, given the CPUs
    "default": lambda cpus: str(cpus),  # torch's default: every CPU in every process
    "one": lambda cpus: "1",
    "auto": lambda cpus: "auto",
}


def _cell(procs: int, threads: str, steps: int, data: Path, out: Path, tag: str) -> float:
    cpus = len(os.sched_getaffinity(0))
    setting = SETTINGS[threads](cpus)
    args = [
        "train",
        "--config",
        str(ROOT / "configs/shapes_det.yaml"),
        f"run.output_dir={out}",
        f"run.name={tag}",
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
        # torchrun sets OMP_NUM_THREADS=1 itself unless it is set; "default" sets it to
        # every CPU, as a user who exports it would.
        if threads == "default":
            env["OMP_NUM_THREADS"] = setting
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rows = (out / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows if "images_per_s" in r][-1]["images_per_s"]


# (processes, setting) measured; 1 thread on 2 processes is what auto gives there.
GRID = [(1, "default"), (1, "one"), (1, "auto"), (2, "default"), (2, "auto")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2, help="repeats, interleaved")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    steps, rounds = (6, 1) if a.quick else (a.steps, a.rounds)
    name = "threads_quick" if a.quick else "threads"
    cells = a.out / f"{name}_cells"
    cells.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):  # each round measures every setting once
            for procs, threads in GRID:
                tag = f"p{procs}_{threads}_s{steps}_r{r}"
                f = cells / f"{tag}.json"
                if not f.exists():
                    ips = _cell(procs, threads, steps, Path(tmp) / "data", Path(tmp) / "runs", tag)
                    row = {"procs": procs, "threads": threads, "round": r, "steps": steps}
                    row |= {"cpus": len(os.sched_getaffinity(0)), "images_per_s": ips}
                    f.write_text(json.dumps(row) + "\n")
                results.append(json.loads(f.read_text()))
    write_results(a.out, name, results, _caption(results, steps, rounds), _table(results))


def _ips(results: list[dict], procs: int, threads: str) -> float | None:
    got = [r["images_per_s"] for r in results if (r["procs"], r["threads"]) == (procs, threads)]
    return statistics.median(got) if got else None


def _table(results: list[dict]) -> str:
    lines = [
        "| processes | torch default (every CPU) img/s | 1 thread img/s | run.threads=auto "
        "img/s | auto / default |",
        "|---|---|---|---|---|",
    ]
    cpus = results[0]["cpus"]
    for procs in (1, 2):
        d, o, t = (_ips(results, procs, k) for k in ("default", "one", "auto"))
        one = f"{o:.1f}" if o is not None else "= auto"
        auto = f"{t:.1f} ({max(1, cpus // procs)} thread(s))"
        lines.append(f"| {procs} | {d:.1f} | {one} | {auto} | {t / d:.2f} |")
    return "\n".join(lines)


def _caption(results: list[dict], steps: int, rounds: int) -> str:
    return (
        f"Default preset (no precise BN), {steps} steps a cell, median of {rounds} "
        f"interleaved round(s), {results[0]['cpus']} CPUs (bench/threads.py). Where auto "
        f"gives as many threads as torch's default, the two columns run the same setting and "
        f"differ by this machine's run-to-run noise"
    )


if __name__ == "__main__":
    main()

"""Helpers shared by the test packages: tiny run settings, subprocess runs of the CLI,
torchrun and the bench scripts.  (Fixtures live in conftest.py; helpers live here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Tiny, fast settings shared by the training tests; on the CPU wherever they run (no
# test may depend on whether the machine has a GPU).
FAST_DET = [
    "run.device=cpu",
    "data.image_size=64",
    "data.num_train=24",
    "data.num_val=8",
    "data.num_workers=0",
    "model.fpn_channels=32",
    # 2 channels per GroupNorm group: at 64 px the head's P7 is 1x1, and 32 groups of 32
    # channels would leave 1 value per group (refused by the run plan)
    "norm.policy.gn_groups=16",
    "train.per_device_batch=2",
    "train.max_steps=4",
    "train.log_interval=1",
    "train.warmup_steps=2",
    "checkpoint.interval=2",
    "wandb.mode=disabled",
    "norm.brn.warmup_steps=2",
]
FAST_CLS = [
    "run.device=cpu",
    "data.image_size=32",
    "data.num_train=24",
    "data.num_val=9",
    "data.num_workers=0",
    "train.per_device_batch=4",
    "train.max_steps=4",
    "train.log_interval=1",
    "train.warmup_steps=1",
    "checkpoint.interval=2",
    "wandb.mode=disabled",
]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # subprocess runs are CPU runs, GPU or not
    return env


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_args(config, out, data_root, name, *extra) -> list[str]:
    """``train`` arguments as ``trainer.cli.main`` takes them."""
    return [
        "train",
        "--config",
        str(config),
        f"run.output_dir={out}",
        f"run.name={name}",
        f"data.root={data_root}",
        *extra,
    ]


def train_cmd(config, out, data_root, name, *extra) -> list[str]:
    """``python -m trainer train ...``; ``train_cmd(...)[1:]`` is what torchrun takes."""
    return [PY, "-m", "trainer", *train_args(config, out, data_root, name, *extra)]


def torchrun_cmd(nproc, *args) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *args,
    ]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root; fail the test with its output if it fails."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_bench(script: str, *args, timeout: int, env: dict | None = None):
    """``python -m bench.<script> args...`` from the repository root, as a user runs it;
    the finished process."""
    module = "bench." + script.removesuffix(".py")
    return subprocess.run(
        [PY, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )

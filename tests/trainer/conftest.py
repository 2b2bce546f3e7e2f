import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Tiny, fast settings shared by the training tests.
FAST_DET = [
    "data.image_size=64",
    "data.num_train=24",
    "data.num_val=8",
    "data.num_workers=0",
    "model.fpn_channels=32",
    "train.per_device_batch=2",
    "train.max_steps=4",
    "train.log_interval=1",
    "train.warmup_steps=2",
    "checkpoint.interval=2",
    "wandb.mode=disabled",
    "norm.brn.warmup_steps=2",
]
FAST_CLS = [
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
    return env


PY = sys.executable

"""Atomic, self-describing checkpoints and auto-resume.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced,
then renamed into place: a crash mid-write leaves the previous checkpoints untouched and
no half-written file under a checkpoint's name.  Files are ``step_XXXXXXXX.pt``; the
newest ``keep`` are kept.  Everything inside loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_checkpoint", "list_checkpoints", "load_latest", "unwrap"]

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and/or torch.compile (no ``module.``/``_orig_mod.``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files, newest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(folder: str | Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


def load_latest(folder: str | Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; unreadable ones are skipped with a warning."""
    for path in list_checkpoints(folder):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # noqa: BLE001 - truncated/corrupt files all mean "skip"
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None

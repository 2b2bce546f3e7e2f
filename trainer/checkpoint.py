"""Checkpoints: what a training state holds, when it is saved, and how a run resumes.

* ``TrainState``: everything a resumed run needs that is not in the config: model,
  optimizer, scheduler, AMP scaler, step, data position (epoch, batch in epoch) and the
  wandb run id, with ``state_dict()`` / ``load_state_dict()``.
* ``Checkpointer``: *when* (every ``interval`` steps, the final step, a preemption) and
  *where* (``step_XXXXXXXX.pt``, the newest ``keep`` kept), plus each rank's RNG states
  and the resume checks.
* ``StopFlag``: SIGTERM/SIGINT become a flag the loop acts on at a step boundary.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced,
then renamed into place: a crash mid-write leaves the previous checkpoints untouched and
no half-written file under a checkpoint's name.  Everything inside loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from norms import NormChoice, is_batch_norm_kind
from trainer.distributed import DistEnv, average_local_bn_stats
from trainer.files import atomic_file
from trainer.rng import gather_rng, restore_rng

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "StopFlag",
    "TrainState",
    "list_checkpoints",
    "load_latest",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap",
]

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    pass


# Tensors of optimizer state per parameter: SGD's momentum buffer, AdamW's two moments.
_OPTIMIZER_SLOTS = {"sgd": 1, "adamw": 2}


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
    try:
        with atomic_file(final) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch reports a failed write as RuntimeError ("unexpected pos"); the OSError
        # (disk full, file too large) is its cause.  atomic_file removed the temporary.
        cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__ or e)
        why = getattr(cause, "strerror", None) or str(cause).splitlines()[0]
        raise CheckpointError(
            f"could not write checkpoint {final}: {why}; the earlier checkpoints are kept"
        ) from None
    # Rotation counts real checkpoints only: a stray file named like one (not a torch zip
    # archive) must not push a good checkpoint out.  It is left alone, with a warning.
    found = list_checkpoints(folder)
    junk = [p for p in found if not zipfile.is_zipfile(p)]
    if junk:
        warnings.warn(
            f"ignoring {len(junk)} file(s) in {folder} named like checkpoints that are not: "
            f"{', '.join(p.name for p in junk)}",
            stacklevel=2,
        )
    for old in [p for p in found if p not in junk][keep:]:
        old.unlink(missing_ok=True)
    return final


# What every normpilot training checkpoint holds (TrainState + Checkpointer.save).
_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch")
_KEYS += ("rng", "config", "policy", "world_size")


def read_checkpoint(path: str | Path, *, metadata_only: bool = False) -> dict:
    """A normpilot training checkpoint, checked; CheckpointError saying why not.

    torch writes a CRC-32 of every record into the zip archive it saves; torch.load does
    not check them, so a flipped block in optimizer state loaded silently.  They are
    verified here first (one read of the file).  ``metadata_only`` (``runs``): no CRC
    pass, and the tensors are memory-mapped, not read, so only the small records are."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = None if metadata_only else z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a torch checkpoint file ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: record {bad} fails its checksum")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=metadata_only)
    except Exception as e:  # noqa: BLE001 - any unloadable file is the same finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} cannot be loaded ({type(e).__name__}: {first[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is not a normpilot checkpoint: it holds a {type(ckpt).__name__}"
        )
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        hint = " (a weights-only file, e.g. from export)" if "model" not in ckpt else ""
        raise CheckpointError(
            f"{path} is not a normpilot training checkpoint{hint}: it has no "
            f"{', '.join(repr(k) for k in missing[:4])}"
        )
    return ckpt


def load_latest(folder: str | Path, *, metadata_only: bool = False) -> tuple[dict, Path] | None:
    """The newest valid checkpoint; unreadable, damaged or foreign files are skipped with
    a warning that says why."""
    for path in list_checkpoints(folder):
        try:
            return read_checkpoint(path, metadata_only=metadata_only), path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


# -- preemption --------------------------------------------------------------------------
class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at a step boundary."""

    def __init__(self):
        self.set = False
        self.raise_now = False  # the final eval: stop at once (the checkpoint is saved)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raise_now or (self.set and signum == signal.SIGINT):  # 2nd Ctrl-C: now
            raise KeyboardInterrupt
        if not self.set and os.environ.get("RANK", "0") == "0":
            print(
                f"stop requested ({signal.Signals(signum).name}): saving a checkpoint after "
                f"the current step",
                file=sys.stderr,
                flush=True,
            )
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- state ---------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint restores.  ``data`` is the batch stream: its ``epoch`` and
    ``pos`` (batches of that epoch already trained) are the data position."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: object
    step: int = 0
    wandb_id: str | None = None

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.data.epoch,
            "batch_in_epoch": self.data.pos,
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, state: dict) -> None:
        model = unwrap(self.model)
        model.load_state_dict(state["model"])
        if state.get("bn_ema"):
            # The model was saved with precise-BN statistics; training goes on from its
            # own moving averages (trainer.recalibrate).
            buffers = model.state_dict()
            with torch.no_grad():
                for key, value in state["bn_ema"].items():
                    buffers[key].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.wandb_id = state["step"], state["wandb_id"]
        self.data.epoch, self.data.pos = state["epoch"], state["batch_in_epoch"]


def _bn_family(kind: str) -> bool:
    try:
        return is_batch_norm_kind(kind)
    except ValueError:  # a kind this version does not know shares nothing either
        return False


def check_resume(
    ckpt: dict, path: Path, arch: str, plan: dict[str, NormChoice], optimizer: str | None = None
) -> None:
    """Refuse a checkpoint that cannot continue this run, naming what differs."""
    old_arch = ckpt.get("config", {}).get("model", {}).get("arch")
    if old_arch != arch:
        raise CheckpointError(
            f"checkpoint {path} is from model.arch={old_arch!r}, this run is "
            f"model.arch={arch!r}: use another run.name or remove the checkpoint"
        )
    old_opt = ckpt.get("config", {}).get("train", {}).get("optimizer")
    if old_opt is not None and old_opt != optimizer:
        raise CheckpointError(
            f"checkpoint {path} was trained with train.optimizer={old_opt!r}, this run has "
            f"train.optimizer={optimizer!r} (their states differ): resume with "
            f"train.optimizer={old_opt}, or use another run.name"
        )
    for part, info in ckpt.get("policy", {}).get("parts", {}).items():
        if part not in plan:
            continue
        old, new = info["kind"], plan[part].kind
        if (old == "gn") != (new == "gn") and all(_bn_family(k) for k in {old, new} - {"gn"}):
            raise CheckpointError(
                f"checkpoint {path} has {part} norm {old!r}, this run's policy picks {new!r}: "
                f"GroupNorm and BatchNorm-family layers do not share state.  Pin the part "
                f"with norm.override.{part}={old} to resume"
            )


def _translate_position(state: TrainState, ckpt: dict, path: Path, batch: int) -> None:
    """The data position is saved in batches; another train.per_device_batch at the same
    world size continues from the same sample, which must start a batch of the new size
    (the sampler's order does not depend on the batch)."""
    old = ckpt.get("config", {}).get("train", {}).get("per_device_batch")
    data = state.data
    if not batch or old in (None, batch) or data.pos == 0:
        return
    samples = data.pos * old
    if samples % batch:
        raise CheckpointError(
            f"checkpoint {path} stopped {samples} samples into epoch {data.epoch} at "
            f"train.per_device_batch={old}; {samples} is not a whole number of batches of "
            f"train.per_device_batch={batch}: resume with train.per_device_batch={old} (then "
            f"change it at the next epoch) or a batch that divides {samples}"
        )
    data.pos = samples // batch


class Checkpointer:
    """When and where checkpoints are written; every rank calls ``save`` (collective).

    ``meta`` (resolved config, policy record) is written into every checkpoint so that
    each file describes its run.
    """

    def __init__(self, folder: Path, env: DistEnv, *, interval: int, keep: int, meta: dict):
        self.folder, self.env = Path(folder), env
        self.interval, self.keep, self.meta = interval, keep, meta
        self.last_saved = -1
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            # A save interrupted mid-write (a second Ctrl-C, a kill) leaves its temporary
            # file; the checkpoints themselves are whole (written, then renamed).
            for stale in self.folder.glob(".step_*.pt.tmp"):
                stale.unlink(missing_ok=True)

    def check_space(self, model: nn.Module, optimizer: str) -> None:
        """Refuse to start when the disk cannot hold one checkpoint of this model (a full
        disk passes the write check at start-up: an empty file needs no space)."""
        if not self.env.is_main:
            return
        weights = sum(t.numel() * t.element_size() for t in unwrap(model).state_dict().values())
        need = weights * (1 + _OPTIMIZER_SLOTS.get(optimizer, 2))
        free = shutil.disk_usage(self.folder).free
        mb = lambda n: f"{n / 2**20:,.0f} MB"  # noqa: E731
        if free < need:
            raise CheckpointError(
                f"{self.folder} has {mb(free)} free; a checkpoint of this model needs about "
                f"{mb(need)}: free some space or set run.output_dir elsewhere"
            )
        if free < need * (self.keep + 1):
            warnings.warn(
                f"{self.folder} has {mb(free)} free, less than checkpoint.keep="
                f"{self.keep} checkpoints of about {mb(need)} each and the one being written",
                stacklevel=2,
            )

    def latest(
        self, arch: str, plan: dict[str, NormChoice], optimizer: str | None = None
    ) -> tuple[dict, Path] | None:
        """The newest readable checkpoint, checked against this run (before any model)."""
        found = load_latest(self.folder)
        if found is not None:
            check_resume(*found, arch, plan, optimizer)
        return found

    def restore(
        self, state: TrainState, found: tuple[dict, Path], reseed: Callable, batch: int = 0
    ) -> None:
        """Load ``found`` into ``state``.  The same world size restores each rank's RNG;
        another one (other data shards) starts the next epoch afresh and calls
        ``reseed(step)``."""
        ckpt, path = found
        try:
            state.load_state_dict(ckpt)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}"
            ) from None
        if ckpt["world_size"] == self.env.world_size:
            _translate_position(state, ckpt, path, batch)
            restore_rng(ckpt["rng"][self.env.rank])
        else:
            data = state.data
            data.epoch, data.pos = data.epoch + (data.pos > 0), 0
            reseed(state.step)
        self.last_saved = state.step
        if self.env.is_main:
            print(
                f"resumed from {path} at step {state.step} (world_size {ckpt['world_size']} "
                f"-> {self.env.world_size})",
                flush=True,
            )

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval == 0 or step == max_steps

    def save(self, state: TrainState, bn_ema: dict | None = None) -> Path | None:
        """Write ``state`` (every rank calls this).  ``bn_ema``: the training moving
        averages when the model holds precise-BN statistics (restored on resume)."""
        # Local BN statistics averaged first, so the file doesn't hold rank 0's alone.
        average_local_bn_stats(state.model, self.env)
        rngs = gather_rng(self.env)
        path = None
        if self.env.is_main:
            ckpt = {
                **state.state_dict(),
                "bn_ema": bn_ema,
                "rng": rngs,
                **self.meta,
                "world_size": self.env.world_size,
            }
            path = save_checkpoint(self.folder, state.step, ckpt, self.keep)
        self.env.barrier()
        self.last_saved = state.step
        return path

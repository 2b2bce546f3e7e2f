"""One optimizer step, and the loss kept on the device between log points.

``train_step`` runs ``grad_accum`` micro-batches (DDP all-reduces on the last one only),
clips, steps the optimizer, scaler and schedule, and returns the mean loss as a device
tensor: reading it is the caller's choice, so a step never waits for the host.
``LossMeter`` sums those tensors and reads them at log points; a non-finite loss raises
``TrainingDiverged`` there, before any checkpoint is written from those steps.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.training import Training

__all__ = ["LossMeter", "TrainingDiverged", "train_step"]


def train_step(t: Training, batches: list) -> torch.Tensor:
    """One optimizer step over ``batches`` (grad_accum micro-batches).  Returns the mean
    loss as a 0-dim device tensor: reading it is the caller's (host-syncing) choice."""
    if t.graphed:
        _check_grads_cleared(t.model)
    loss_sum = None
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext()
        if isinstance(t.net, DDP) and i < len(batches) - 1:
            sync = t.net.no_sync()  # all-reduce gradients once, on the last one
        autocast = torch.autocast(
            t.device.type,
            dtype=t.amp_dtype or torch.float32,
            enabled=t.amp_dtype is not None,
            cache_enabled=not t.graphed,  # a captured graph must not hold the cast cache
        )
        with sync, autocast:
            loss = _loss(t, batch)
            t.scaler.scale(loss / t.grad_accum).backward()
        part = loss.detach().float() / t.grad_accum
        loss_sum = part if loss_sum is None else loss_sum + part
    if t.clip_grad_norm is not None:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), t.clip_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    return loss_sum


def _check_grads_cleared(model: nn.Module) -> None:
    """A graphed backward hands back its static gradient buffers, which the parameters
    adopt: zeroing them in place (``zero_grad(set_to_none=False)``) and backpropagating
    again would add the new gradient to the old one.  Graphed training therefore needs
    every gradient set to None between steps, as ``train_step`` does; code that keeps
    gradients (an injected optimizer step, gradient accumulation) is refused here."""
    if any(p.grad is not None for p in model.parameters()):
        raise RuntimeError(
            "a graphed training step found gradients left from before it: graphed "
            "training needs optimizer.zero_grad(set_to_none=True) between steps"
        )


class TrainingDiverged(ValueError):
    """The loss went non-finite: a user-facing error (no traceback)."""


class LossMeter:
    """Step losses summed on the device; read on the host only at log points."""

    def __init__(self, step: int, clip: float | None = None):
        self.clip = clip
        self._start(step)

    def _start(self, step: int) -> None:
        self.sum, self.first, self.t0 = None, step + 1, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.sum = loss if self.sum is None else self.sum + loss

    def check(self, step: int) -> None:
        if self.sum is not None and not torch.isfinite(self.sum):
            self._raise(step)

    def read(self, step: int) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last read; a host sync."""
        steps = step - self.first + 1
        loss = self.sum.item() / steps
        seconds = time.perf_counter() - self.t0
        if not math.isfinite(loss):
            self._raise(step)
        self._start(step)
        return loss, steps, seconds

    def _raise(self, step: int):
        advice = (
            "(train.clip_grad_norm is set); lower train.lr"
            if self.clip is not None
            else "lower train.lr or set train.clip_grad_norm"
        )
        raise TrainingDiverged(
            f"the loss is not finite in steps {self.first}-{step} "
            f"(loss sum {self.sum.item()}) {advice}. No checkpoint was written from these "
            f"steps"
        )


def _loss(t: Training, batch) -> torch.Tensor:
    if t.task == "detection":
        images, targets = batch
        images = [im.to(t.device, non_blocking=True) for im in images]
        targets = [
            {
                k: (v.to(t.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in tgt.items()
            }
            for tgt in targets
        ]
        return sum(t.net(images, targets).values())
    images, labels, _ = batch
    logits = t.net(images.to(t.device, non_blocking=True))
    return nn.functional.cross_entropy(logits, labels.to(t.device, non_blocking=True))

"""Precise BN at the trainer's eval and save points (``norm.precise_bn``).

Before every evaluation and every checkpoint save, the running statistics of the
BatchNorm-family layers are recomputed by ``norms.precise_bn`` over the first
``num_batches`` batches of the current epoch, so evaluations and saved (and exported)
weights carry them.  Training itself goes on from its own moving averages: they are
put back afterwards, and saved in the checkpoint as ``bn_ema`` so that a resumed run
continues exactly as an uninterrupted one (Batch Renorm's r and d read them).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from norms import precise_bn, running_stat_layers
from trainer.plan import PreciseBNPlan

__all__ = ["Recalibrator"]


class Recalibrator:
    def __init__(self, plan: PreciseBNPlan, t, stream, logger):
        self.plan, self.t, self.stream, self.logger = plan, t, stream, logger
        self._said_short = False

    @contextlib.contextmanager
    def precise(self, step: int, keep: bool = False):
        """Precise statistics inside the block; yields the training EMA ({state_dict key:
        tensor}) that comes back after it (unless ``keep``), or None when disabled."""
        if not self.plan.enabled:
            yield None
            return
        model = self.t.model
        ema = _running_stats(model)
        saved = {k: v.clone() for k, v in ema.items()}
        t0 = time.perf_counter()
        # The first batches of the current epoch: the dataset's epoch (augmentation
        # seeds) stays what the training stream set; precise_bn forks the RNG.
        batches = self.stream.loader(epoch=self.stream.epoch, skip_batches=0)
        n = precise_bn(model, batches, self.plan.num_batches, forward=self._forward)
        seconds = time.perf_counter() - t0
        if n < self.plan.num_batches and not self._said_short and self.logger.enabled:
            self._said_short = True  # once: every recalibration of the run is as short
            print(
                f"precise BN: {n} batches (one epoch of this rank's data) instead of "
                f"norm.precise_bn.num_batches={self.plan.num_batches}",
                flush=True,
            )
        self.logger.log({"step": step, "precise_bn_s": seconds, "precise_bn_batches": n})
        try:
            yield saved
        finally:
            if not keep:
                with torch.no_grad():
                    for k, v in ema.items():
                        v.copy_(saved[k])

    def _forward(self, model: nn.Module, batch) -> None:
        t = self.t
        with torch.autocast(
            t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None
        ):
            images = batch[0]
            if t.task == "detection":
                model([im.to(t.device, non_blocking=True) for im in images])
            else:
                model(images.to(t.device, non_blocking=True))


def _running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running-statistics buffers of the layers precise BN recalibrates, by key."""
    layers = {id(m) for m in running_stat_layers(model)}
    return {
        f"{name}.{buf}": getattr(m, buf)
        for name, m in model.named_modules()
        if id(m) in layers
        for buf in ("running_mean", "running_var")
    }

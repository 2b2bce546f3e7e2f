"""Precise BatchNorm statistics: recompute running statistics as an exact average over
many batches (Wu & Johnson, 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3; detectron2
/ fvcore ``update_bn_stats``; ``torch.optim.swa_utils.update_bn``).

Training leaves BatchNorm's running statistics as an exponential moving average of batch
statistics taken while the weights were still moving, and at small batch each of those
is noisy: at batch 2, BN's or Batch Renorm's final momentum-0.1 snapshot can be far from
the statistics the trained weights produce.  ``precise_bn`` runs ``num_batches`` batches
through the model in train mode (for the BatchNorm-family layers only; every other module
in eval mode, so a detector takes its inference path and needs no targets) and sets

    running_mean = (1/K) sum_k mean_k          running_var = (1/K) sum_k var_k

where mean_k and var_k are layer inputs' per-channel batch mean and *unbiased* batch
variance for batch k.  That is BatchNorm's own running_var convention (unbiased per
batch) averaged over batches, as detectron2's ``update_bn_stats`` and
``torch.optim.swa_utils.update_bn`` (momentum=None: cumulative average) both do; it is
not the variance of the union of all batches, which would add the spread of the batch
means.  Layers see the activations of batch statistics upstream, i.e. of training.

Batch Renorm layers run with r=1, d=0 (plain BatchNorm) during the passes.  Synchronized
layers (SyncBN, SyncBRN) combine every rank's moments per batch in their forward, as in
training, so every rank ends with the same statistics; every rank must then pass the
same number of batches.  Covered: BN, BRN, SyncBN, SyncBRN (and torch's SyncBatchNorm):
the layers of ``running_stat_layers``; not GroupNorm, not FrozenBatchNorm2d.

Nothing else changes: no weight, no gradient, no RNG state (CPU and CUDA generators are
forked), and ``num_batches_tracked`` keeps its value (Batch Renorm counts its clip-limit
ramp with it; it still counts training forwards only).  Momentum, Batch Renorm's limits
and every module's train/eval mode are restored; if a batch fails, the old statistics
are put back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from norms.batch_renorm import _RenormMixin
from norms.convert import running_stat_layers

__all__ = ["precise_bn"]


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: int = 200,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm-family layers over the
    first ``num_batches`` of ``batches``; returns how many batches were used.

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``), e.g. to move it
    to the device or to run under autocast as in training.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    layers = running_stat_layers(model)
    if not layers:
        return 0
    forward = forward or (lambda m, b: m(b))
    modes = [(m, m.training) for m in model.modules()]
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), _clone(m.num_batches_tracked))
        for m in layers
    ]
    limits = [(m, m.rmax, m.dmax) for m in layers if isinstance(m, _RenormMixin)]
    means = [torch.zeros_like(m.running_mean) for m in layers]
    variances = [torch.zeros_like(m.running_var) for m in layers]
    done = False
    try:
        model.eval()
        for m in layers:
            m.train()
            m.momentum = 1.0  # after a forward, the running stats *are* that batch's
        for m, _, _ in limits:
            m.rmax, m.dmax = 1.0, 0.0  # r = 1, d = 0: plain BatchNorm
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            n = _average(
                model, layers, itertools.islice(batches, num_batches), forward, means, variances
            )
        if n == 0:
            raise ValueError("precise_bn: the batches iterable is empty")
        for m, mean, var in zip(layers, means, variances, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        done = True
        return n
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
            if not done:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, rmax, dmax in limits:
            m.rmax, m.dmax = rmax, dmax
        for m, mode in modes:
            m.training = mode


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.state_dict().values() if t.is_cuda})


def _average(model, layers, batches, forward, means, variances) -> int:
    """Run ``batches``; ``means``/``variances`` become the running averages of each
    layer's per-batch statistics (its running stats at momentum 1).  Returns the count."""
    n = 0
    for batch in batches:
        forward(model, batch)
        n += 1
        for m, mean, var in zip(layers, means, variances, strict=True):
            mean.add_(m.running_mean - mean, alpha=1.0 / n)
            var.add_(m.running_var - var, alpha=1.0 / n)
    return n

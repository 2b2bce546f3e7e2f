"""Optimizer, warm-up + cosine schedule, and learning-rate scaling with the global batch."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["scaled_lr", "build_optimizer", "build_scheduler"]


def scaled_lr(lr: float, ref_batch: int, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr is given for ``ref_batch`` samples per
    optimizer step; the run's step sees ``global_batch`` (per_device x world x accum)."""
    return lr * global_batch / ref_batch


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    # No weight decay on norm affines and biases (1-d parameters): decaying a norm's
    # scale fights the normalization it follows.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)

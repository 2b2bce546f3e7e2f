"""Weight Standardization (Qiao et al., 2019, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", https://arxiv.org/abs/1903.10520).

Each output channel's kernel is standardized before the convolution:

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

with mean and *biased* variance over (in_channels / groups, kh, kw) and eps inside the
square root, default 1e-6.  That is timm's ``StdConv2d`` convention.  mmcv's ``ConvWS2d``
differs: it divides by ``std + eps`` with the *unbiased* std (eps=1e-5 outside the root),
so the two agree only up to a factor sqrt(n / (n - 1)) per channel (n = fan-in) plus the
eps placement; weights trained with one are not bit-compatible with the other.

Paired with GroupNorm, WS recovers most of BatchNorm's accuracy at 1-2 images per GPU
(the paper's detection results); normpilot uses the pair in detection heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WSConv2d", "convert_convs_to_ws", "standardize_weight"]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardized copy of a conv weight (out, in/groups, kh, kw); differentiable."""
    # A fused batch_norm over the (1, out, fan_in) view computes exactly the per-output
    # channel biased mean/var normalization, forward and backward, in one kernel each.
    out = weight.shape[0]
    return F.batch_norm(
        weight.reshape(1, out, -1), None, None, training=True, momentum=0.0, eps=eps
    ).reshape_as(weight)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized per output channel on every forward."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)


def convert_convs_to_ws(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``module`` (itself included) by a ``WSConv2d``.

    The original weights and bias are kept (the same Parameter objects, so an optimizer
    built before the swap still updates them), as are device, dtype, requires_grad and
    train/eval mode.  Already-standardized convs are left alone.  Returns the module.
    """
    memo: dict[int, nn.Module] = {}

    def swap(conv: nn.Conv2d) -> WSConv2d:
        if id(conv) not in memo:
            ws = WSConv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                conv.bias is not None,
                conv.padding_mode,
                eps=eps,
                device="meta",
            )
            ws.weight = conv.weight
            ws.bias = conv.bias
            ws.train(conv.training)
            memo[id(conv)] = ws
        return memo[id(conv)]

    def is_plain_conv(m: nn.Module) -> bool:
        return type(m) is nn.Conv2d

    if is_plain_conv(module):
        return swap(module)
    for parent in module.modules():
        # _modules, not named_children(): the latter hides a child registered twice.
        for name, child in list(parent._modules.items()):
            if is_plain_conv(child):
                setattr(parent, name, swap(child))
    return module

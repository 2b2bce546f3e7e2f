"""Normalization over the valid region of a padded canvas.

A CUDA graph holds one input shape, while a detector's batches come in many padded
shapes.  To replay one graph for all of them, each batch is padded further, to a fixed
canvas, and the network must then compute on the canvas exactly what it computes on the
batch alone.  Zeros in the padding would change every statistic a norm takes (BatchNorm's
over the batch, GroupNorm's per image), and a conv's bias or a norm's shift would make
the padding non-zero for the next layer, which on the batch alone sees zero padding.

So, while a ``Region`` is active (``Padding.on``), inside the module ``mask_padding``
prepared:

* every BatchNorm / Batch Renorm / GroupNorm layer takes its statistics over the valid
  region only (counting its positions, not the canvas's), and updates its running
  statistics, step count and Batch Renorm state from them;
* every norm, conv and pooling output is zero outside the region, as the eager
  network's own padding is (a max-pool after a ReLU pads with zeros in effect).

The valid region is the top-left (h, w) of the canvas at the input; a map k stride-2
layers down holds ceil(h / 2^k) valid rows (every stride-2 layer pads, so it rounds up).
Its extent is a device tensor, so a graph captured once reads each batch's region,
copied in before the replay; the masks are computed from it inside the graph.  Outside
an active region every layer runs its own forward.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from norms.batch_renorm import _BatchRenorm, update_running
from norms.functional import acc_dtype

__all__ = ["Padding", "Region", "halvings", "mask_padding", "valid_size"]


def halvings(canvas: int, size: int) -> int:
    """How many stride-2 layers (each ceil(n / 2)) turn ``canvas`` into ``size``."""
    k, n = 0, canvas
    while n > size:
        n, k = -(-n // 2), k + 1
    if n != size:
        raise ValueError(f"a map of {size} is not a canvas of {canvas} halved k times")
    return k


def valid_size(canvas: int, extent: int, size: int) -> int:
    """The valid rows (or columns) of a map of ``size`` over a canvas of ``canvas`` whose
    valid part at the input is ``extent`` (host ints)."""
    return math.ceil(extent / 2 ** halvings(canvas, size))


class Region:
    """The valid top-left part of a (H, W) canvas; ``set`` gives each batch's extent."""

    def __init__(self, canvas: tuple[int, int], device=None):
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.hw = torch.tensor(self.canvas, dtype=torch.int64, device=device)
        self._masks: dict = {}

    def set(self, h: int, w: int) -> None:
        """This batch's valid (h, w); device-side fills, no host synchronization."""
        if not (0 < h <= self.canvas[0] and 0 < w <= self.canvas[1]):
            raise ValueError(f"a {h}x{w} batch does not fit the canvas {self.canvas}")
        self.hw[0].fill_(h)
        self.hw[1].fill_(w)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """(H, W) float mask of the valid positions of ``x``'s map (…, H, W)."""
        h, w = x.shape[-2:]
        key = (h, w, x.device)
        if key not in self._masks:
            limits = []
            for canvas, size, extent in zip(self.canvas, (h, w), self.hw, strict=True):
                step = 2 ** halvings(canvas, size)
                limits.append((extent + step - 1) // step)
            rows = torch.arange(h, device=x.device) < limits[0]
            cols = torch.arange(w, device=x.device) < limits[1]
            self._masks[key] = (rows[:, None] & cols[None, :]).to(acc_dtype(x))
        return self._masks[key]

    def clear(self) -> None:
        self._masks.clear()


class Padding:
    """Which region, if any, the prepared layers normalize over now."""

    def __init__(self) -> None:
        self.current: Region | None = None

    @contextlib.contextmanager
    def on(self, region: Region):
        region.clear()  # masks are recomputed from the extent (inside a graph, too)
        self.current = region
        try:
            yield region
        finally:
            self.current = None
            region.clear()


def _moments(x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...], count):
    """Mean and biased variance of ``x`` over ``dims`` where ``m`` is 1 (differentiable)."""
    xa = x.to(m.dtype)
    mean = (xa * m).sum(dims, keepdim=True) / count
    var = ((xa - mean).square() * m).sum(dims, keepdim=True) / count
    return mean, var


def _batch_norm(mod: _BatchNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    count = m.sum() * x.shape[0]
    mean, var = _moments(x, m, (0, 2, 3), count)
    mean_c, var_c = mean.detach().flatten(), var.detach().flatten()
    r = d = None
    if isinstance(mod, _BatchRenorm) and mod.track_running_stats:
        r, d, _ = mod._renorm_factors(mean_c, var_c, count)
    elif mod.track_running_stats:
        with torch.no_grad():
            update_running(mod, mean_c, var_c, count)
    y = (x.to(m.dtype) - mean) * torch.rsqrt(var + mod.eps)
    if r is not None:
        y = y * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    if mod.affine:
        y = y * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)
    return (y * m).to(x.dtype)


def _group_norm(mod: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    g = mod.num_groups
    xg = x.reshape(n, g, c // g, h, w)
    mean, var = _moments(xg, m, (2, 3, 4), m.sum() * (c // g))
    y = ((xg.to(m.dtype) - mean) * torch.rsqrt(var + mod.eps)).reshape(n, c, h, w)
    if mod.affine:
        y = y * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)
    return (y * m).to(x.dtype)


def _batch_statistics(mod: nn.Module) -> bool:
    """Whether ``mod`` normalizes with statistics of this batch right now."""
    if isinstance(mod, nn.GroupNorm):
        return True
    if isinstance(mod, _BatchNorm):
        return mod.training or not mod.track_running_stats
    return False  # FrozenBatchNorm2d: a fixed affine


def _masked(mod: nn.Module, eager, padding: Padding):
    how = _group_norm if isinstance(mod, nn.GroupNorm) else _batch_norm

    def forward(x):
        region = padding.current
        if region is None:
            return eager(x)
        m = region.mask(x)
        if not _batch_statistics(mod):  # running stats or a fixed affine: zero outside
            return eager(x) * m.to(x.dtype)
        return how(mod, x, m)

    return forward


def _is_norm(mod: nn.Module) -> bool:
    from norms.convert import is_batch_norm

    if isinstance(mod, _BatchNorm) and type(mod).__module__ == "norms.sync":
        raise TypeError(f"{type(mod).__name__}: a synchronized norm on a padded canvas")
    return isinstance(mod, (nn.GroupNorm, _BatchNorm)) or is_batch_norm(mod)


# Layers whose output at a position reads its neighbours: a valid position next to the
# region's edge makes the position beyond it non-zero (a conv's window, a max-pool's).
_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def mask_padding(module: nn.Module, padding: Padding):
    """Prepare ``module``'s convs and norms to compute on a canvas, while
    ``padding.current`` is set, what they compute on its valid region alone.  Returns
    an ``undo()`` that restores the module.  A norm with statistics it cannot restrict
    to a region (a synchronized layer) raises TypeError."""
    hooks, patched = [], []
    for mod in module.modules():
        if isinstance(mod, _SPATIAL):
            hooks.append(mod.register_forward_hook(_conv_hook(padding)))
            continue
        if _is_norm(mod):
            mod.forward = _masked(mod, mod.forward, padding)
            patched.append(mod)

    def undo() -> None:
        for h in hooks:
            h.remove()
        for mod in patched:
            del mod.forward

    return undo


def _conv_hook(padding: Padding):
    def hook(_mod, _args, out):
        region = padding.current
        if region is None:
            return None
        return out * region.mask(out).to(out.dtype)

    return hook

"""Batch-norm building blocks shared by Batch Renorm and the portable SyncBN.

Every training-mode layer in this package is the same three steps:

1. statistics: per-channel mean and *biased* variance of the input over every dim but
   channels (``batch_stats``), optionally combined across a process group weighted by
   each rank's element count (``sync_stats``);
2. a decision made in the module from those statistics (Batch Renorm's r and d, the
   running-statistics update);
3. ``normalize``: ``y = w_eff * (x - mean) / sqrt(var + eps) + b_eff``.

Step 3 is an autograd Function so that it can reuse the fused batch-norm kernels in both
directions, which is what keeps Batch Renorm close to ``nn.BatchNorm2d`` in speed:

* forward is ``F.batch_norm(training=False)`` fed the *batch* mean and variance as if they
  were running statistics: one fused per-channel affine pass over the input;
* backward is ``aten.native_batch_norm_backward`` with ``save_mean``/``save_invstd`` set to
  those statistics.  With no process group it returns every gradient at once.  With a
  group it is asked only for the two per-channel reductions (sum(dy) and
  sum(dy * x_hat)); those are all-reduced and the input gradient is formed from the global
  sums.

``mean`` and ``invstd`` are treated as functions of the input (as in BatchNorm), whereas
``w_eff = weight * r`` and ``b_eff = bias + weight * d`` get Batch Renorm's r and d as
constants: gradients reaching ``w_eff``/``b_eff`` are mapped back to ``weight``/``bias``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["batch_stats", "sync_stats", "moved", "normalize", "unbiased", "acc_dtype"]


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 inputs keep float64 statistics; everything else (fp16/bf16 under autocast
    # included) is reduced in float32: fp16 sums of squares overflow, bf16 keeps 8 bits.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, biased variance, count) of ``x`` (N, C, *), in ``acc_dtype(x)``.

    An empty batch gives zeros and count 0, so it can take part in a group reduction.
    The result carries no autograd history: ``normalize`` differentiates through the
    statistics itself.
    """
    x = x.detach()
    c = x.shape[1]
    count = x.numel() // c if c else 0
    dt = acc_dtype(x)
    if count == 0:
        zeros = torch.zeros(c, dtype=dt, device=x.device)
        return zeros, zeros.clone(), 0
    if x.dtype != dt:
        x = x.to(dt)
    if x.device.type == "cpu":
        # The fused CPU statistics kernel BatchNorm itself uses (one pass, vectorized,
        # channels_last aware); ~2x faster than var_mean over dims (0, 2, 3) on NCHW.
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, var, count


def sync_stats(
    mean: torch.Tensor, var: torch.Tensor, count: int, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-rank statistics into group-wide ones, weighted by element counts.

    Each rank contributes (count, mean, M2 = count * var); the combination is Chan et al.'s
    parallel variance formula, exact for uneven and empty shards and free of the
    cancellation that sum/sum-of-squares suffers when |mean| >> std.  The exchange is done
    in float64: it is 2C+1 numbers, and the counts must stay exact integers.

    The group-wide count is returned as a 0-dim float64 tensor on the device, never read
    by the host (one read per layer would stall a GPU forward ~50 times in a ResNet-50):
    an all-empty group gives zeros, and the callers keep their buffers still with
    arithmetic on it (``moved``), not with a branch.
    """
    world = dist.get_world_size(group)
    c = mean.numel()
    local = torch.empty(2 * c + 1, dtype=torch.float64, device=mean.device)
    local[0] = count
    local[1 : c + 1] = mean
    local[c + 1 :] = var * count
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 2C+1)
    counts = table[:, :1]
    total = counts.sum()
    safe = total.clamp(min=1)  # an all-empty group: 0 / 1, zeros
    means, m2 = table[:, 1 : c + 1], table[:, c + 1 :]
    g_mean = (counts * means).sum(0) / safe
    g_m2 = (m2 + counts * (means - g_mean) ** 2).sum(0)
    return g_mean.to(mean.dtype), (g_m2 / safe).to(mean.dtype), total


def moved(total) -> torch.Tensor | int:
    """1 where the statistics came from at least one value, else 0: a host int for a
    local count, a device tensor for a group-wide one (``sync_stats``)."""
    return (total > 0).to(torch.int64) if isinstance(total, torch.Tensor) else int(total > 0)


def unbiased(var: torch.Tensor, total) -> torch.Tensor:
    """The unbiased variance from a biased one over ``total`` values (host int or device
    tensor; a total of 1 or 0 gives var itself rather than a division by zero)."""
    if isinstance(total, torch.Tensor):
        return var * (total / (total - 1).clamp(min=1)).to(var.dtype)
    return var * (total / max(1, total - 1))


class _NormalizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, invstd, r, d, eps, group, total):
        acc = mean.dtype
        c = mean.numel()
        w = _as(weight, acc) if weight is not None else mean.new_ones(c)
        b = _as(bias, acc) if bias is not None else mean.new_zeros(c)
        # Fold r and d into the affine so one fused pass does the whole layer.
        w_eff = w * r if r is not None else w
        b_eff = torch.addcmul(b, w, d) if d is not None else b
        if x.numel() == 0:
            y = torch.empty_like(x)
        elif torch.is_autocast_enabled(x.device.type):
            # Output in the input's dtype, statistics and affine in fp32.
            with torch.autocast(x.device.type, enabled=False):
                y = torch.native_batch_norm(x, w_eff, b_eff, mean, var, False, 0.0, eps)[0]
        else:
            # Eval-mode batch norm fed the batch statistics: one fused affine pass.
            y = torch.native_batch_norm(x, w_eff, b_eff, mean, var, False, 0.0, eps)[0]
        ctx.eps, ctx.group, ctx.total = eps, group, total
        ctx.param_dtype = weight.dtype if weight is not None else acc
        if invstd is None:
            invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, invstd, w_eff, r, d)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, w_eff, r, d = ctx.saved_tensors
        group = ctx.group
        need_x = ctx.needs_input_grad[0]
        c = mean.numel()
        if x.numel() == 0:
            g_weff = torch.zeros(c, dtype=mean.dtype, device=mean.device)
            g_beff = torch.zeros_like(g_weff)
            gx = torch.zeros_like(x) if need_x else None
        else:
            if not dy.is_contiguous(memory_format=_memory_format(x)):
                dy = dy.contiguous(memory_format=_memory_format(x))
            # grad_weight of the fused backward is sum(dy * x_hat) and grad_bias is
            # sum(dy), both local to this rank; x_hat uses the saved (group-wide) stats.
            gx, g_weff, g_beff = torch.ops.aten.native_batch_norm_backward(
                dy,
                x,
                w_eff,
                None,
                None,
                mean,
                invstd,
                True,
                ctx.eps,
                [need_x and group is None, True, True],
            )
        if group is not None:
            # The input gradient needs the group-wide sums.  Every rank calls this
            # all_reduce, an empty one included, so no rank is left waiting.
            packed = torch.cat([g_beff, g_weff]).to(torch.float64)
            dist.all_reduce(packed, group=group)
            sum_dy, sum_dy_xhat = packed.to(mean.dtype).split(c)
            if need_x and x.numel() > 0:
                total = ctx.total.clamp(min=1).to(mean.dtype)  # a device tensor
                gx = _input_grad(dy, x, mean, invstd, w_eff, sum_dy / total, sum_dy_xhat / total)
        # y = w_eff * x_hat + b_eff with w_eff = w * r, b_eff = b + w * d (r, d constant):
        # dL/dw = r * sum(dy * x_hat) + d * sum(dy), dL/db = sum(dy).  These stay local:
        # summed over ranks (by DDP) they equal the single-process gradient.
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = g_weff * r if r is not None else g_weff
            if d is not None:
                gw = torch.addcmul(gw, g_beff, d)
            gw = _as(gw, ctx.param_dtype)
        if ctx.needs_input_grad[2]:
            gb = _as(g_beff, ctx.param_dtype)
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A Python-side check is cheaper than a no-op .to() through the dispatcher.
    return t if t.dtype == dtype else t.to(dtype)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _input_grad(dy, x, mean, invstd, w, mean_dy, mean_dy_xhat):
    """dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with group-wide means.

    Written as dx = a * dy + b * x + c with per-channel a, b, c: two fused passes.
    """
    a = w * invstd
    b = -a * invstd * mean_dy_xhat
    c = -a * mean_dy - b * mean
    shape = [1, -1] + [1] * (x.dim() - 2)
    gx = torch.addcmul(c.view(shape), dy, a.view(shape))
    gx.addcmul_(x, b.view(shape))
    return gx.to(x.dtype)


def normalize(x, weight, bias, mean, var, eps, r=None, d=None, group=None, total=0, invstd=None):
    """Apply ``weight * (r * (x - mean) / sqrt(var + eps) + d) + bias`` per channel.

    ``mean``/``var`` are the batch (or group-wide) statistics from ``batch_stats`` /
    ``sync_stats``; gradients flow to ``x`` through them as in BatchNorm.  ``r``/``d`` are
    Batch Renorm's corrections, constants for autograd (None means 1 and 0).  ``group``
    and ``total`` (the group-wide count) make the input gradient use group-wide sums.
    ``invstd`` (= rsqrt(var + eps)) may be passed when the caller already has it.
    """
    return _NormalizeFn.apply(x, weight, bias, mean, var, invstd, r, d, eps, group, total)

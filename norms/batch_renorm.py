"""Batch Renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models", https://arxiv.org/abs/1702.03275).

Training forward, per channel (statistics over every dim but channels):

    mu_B    = mean(x)                 var_B = mean((x - mu_B)^2)      (biased)
    sigma_B = sqrt(var_B + eps)       sigma_R = sqrt(running_var + eps)
    r = clip(sigma_B / sigma_R,           1/rmax_t, rmax_t)   # constant in backward
    d = clip((mu_B - running_mean) / sigma_R, -dmax_t,  dmax_t)   # constant in backward
    y = weight * (r * (x - mu_B) / sigma_B + d) + bias

``running_mean``/``running_var`` in r and d are the values from *before* this step's
update.  The clip limits ramp linearly over ``warmup_steps`` training forwards (the paper
relaxes them gradually from BatchNorm's r=1, d=0):

    a = min(1, t / warmup_steps)   rmax_t = 1 + a * (rmax - 1)   dmax_t = a * dmax

where t = ``num_batches_tracked`` before this forward (training forwards so far);
``warmup_steps=0`` applies the full limits at once.  Converting a trained BatchNorm layer
keeps its ``num_batches_tracked``, so a fine-tune from a pretrained backbone starts with
its warm-up already done.

Running statistics are updated exactly as ``nn.BatchNorm`` does: ``momentum`` is the
weight of the new value (``None`` = cumulative average), the variance stored is the
*unbiased* batch variance, and ``num_batches_tracked`` counts training forwards only.
The buffers and state_dict keys are BatchNorm's, so checkpoints move freely between BN,
BRN and SyncBN.  Eval normalizes with the running statistics and touches no buffer; with
``track_running_stats=False`` the layer is BatchNorm on batch statistics (r=1, d=0).
With ``rmax=1, dmax=0`` the layer is BatchNorm.

Implementation: r and d are folded into the affine (``weight * r``, ``bias + weight * d``)
of batch-norm kernels, so a training step is never a chain of elementwise ops.  Two
routes, chosen by ``impl``:

* ``fused`` (``impl="auto"`` on the CPU): an autograd Function over the fused kernels
  fed the statistics already computed for r and d (``norms.functional.normalize``); one
  statistics pass, the cheapest route where each op costs host time;
* ``native`` (``impl="auto"`` on CUDA, single process): ``F.batch_norm`` in training mode
  with the folded affine (``renorm_native``); autograd stays in C++, which is what
  matters on a GPU at small batch, where the step is bound by op dispatch.

No route reads a tensor on the host during a training step: the clip-limit ramp is
computed on the device from ``num_batches_tracked``.  Synchronized layers with a process
group always take the fused route (its backward all-reduces the group-wide sums).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from norms.functional import batch_stats, moved, normalize, sync_stats, unbiased

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_limits",
    "renorm_diagnostics",
    "renorm_native",
]


def _ramp(t, hold: int, end: int):
    """0 until ``hold`` forwards, then linear to 1 at ``end``: a float, or a tensor when
    ``t`` is one (then computed on its device, no host read)."""
    if end <= hold:
        return (t >= hold).to(t.dtype) if isinstance(t, torch.Tensor) else float(t >= hold)
    if isinstance(t, torch.Tensor):
        return ((t - hold) / (end - hold)).clamp_(0.0, 1.0)
    return min(1.0, max(0.0, (t - hold) / (end - hold)))


def renorm_limits(
    rmax: float,
    dmax: float,
    warmup_steps: int,
    t,
    hold_steps: int = 0,
    d_warmup_steps: int | None = None,
):
    """(rmax_t, dmax_t) after ``t`` training forwards.

    Plain BatchNorm (1, 0) for the first ``hold_steps``; then rmax_t ramps linearly to
    ``rmax`` at ``warmup_steps`` and dmax_t to ``dmax`` at ``d_warmup_steps`` (default:
    ``warmup_steps``).  The paper's Inception-v3 schedule is hold 5k, d at 25k, r at 40k.

    ``t`` may be a tensor (the layer's ``num_batches_tracked``, in the dtype wanted): the
    limits are then computed on its device and never read by the host, so a training
    step has no host sync and the ramp keeps advancing inside a captured CUDA graph.
    """
    d_end = warmup_steps if d_warmup_steps is None else d_warmup_steps
    if warmup_steps <= 0 and d_end <= 0 and hold_steps <= 0:
        return rmax, dmax
    a_r = _ramp(t, hold_steps, warmup_steps)
    a_d = a_r if d_end == warmup_steps else _ramp(t, hold_steps, d_end)
    if isinstance(a_r, torch.Tensor):
        return a_r.mul(rmax - 1.0).add_(1.0), a_d.mul(dmax)
    return 1.0 + a_r * (rmax - 1.0), a_d * dmax


def update_running(layer: _BatchNorm, mean: torch.Tensor, var: torch.Tensor, total) -> None:
    """BatchNorm's update of ``layer``'s buffers: the step count, then the running stats
    moved towards the batch's mean and unbiased variance (Batch Renorm: after r and d
    used the old ones).  ``total`` is a host int, or a device tensor (a group's count, a
    padded canvas's region) read by no host: 0 moves nothing.  nn.BatchNorm's momentum
    rule; the cumulative average's 1/t stays a device tensor."""
    step = moved(total)
    layer.num_batches_tracked.add_(step)
    var_u = unbiased(var, total)
    dtype = layer.running_mean.dtype
    new = (mean, var_u) if mean.dtype == dtype else (mean.to(dtype), var_u.to(dtype))
    if layer.momentum is None:
        # (clamped: a group with no values leaves the count at 0 and moves nothing)
        factor = layer.num_batches_tracked.clamp(min=1).to(dtype).reciprocal()
    else:
        factor = layer.momentum
    if isinstance(step, torch.Tensor):
        factor = step.to(dtype) * factor
    if isinstance(factor, torch.Tensor):
        for buf, value in zip((layer.running_mean, layer.running_var), new, strict=True):
            buf.lerp_(value, factor)
    else:
        torch._foreach_lerp_([layer.running_mean, layer.running_var], list(new), factor)


class _RenormMixin:
    """Batch Renorm's parameters, the r/d computation and the running-stat update.

    Shared by the single-process layers below and ``norms.sync.SyncBatchRenorm``.
    """

    def _init_renorm(
        self,
        rmax: float,
        dmax: float,
        warmup_steps: int,
        impl: str,
        hold_steps: int = 0,
        d_warmup_steps: int | None = None,
    ) -> None:
        if impl not in ("auto", "fused", "native"):
            raise ValueError(f"impl must be 'auto', 'fused' or 'native', got impl={impl!r}")
        self.impl = impl
        if rmax < 1.0:
            raise ValueError(f"rmax must be >= 1, got rmax={rmax}")
        if dmax < 0.0:
            raise ValueError(f"dmax must be >= 0, got dmax={dmax}")
        for name, v in (("warmup_steps", warmup_steps), ("hold_steps", hold_steps)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={v}")
        if d_warmup_steps is not None and d_warmup_steps < 0:
            raise ValueError(f"d_warmup_steps must be >= 0 or None, got {d_warmup_steps}")
        self.hold_steps = int(hold_steps)
        self.d_warmup_steps = None if d_warmup_steps is None else int(d_warmup_steps)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), int(warmup_steps)
        # Diagnostics of the last training forward (not state: kept out of state_dict).
        self.last_r: torch.Tensor | None = None
        self.last_d: torch.Tensor | None = None
        self.last_limits: tuple = (1.0, 0.0)  # floats, or 0-dim tensors on the device

    def _renorm_extra_repr(self) -> str:
        text = f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"
        if self.hold_steps or self.d_warmup_steps is not None:
            text += f", hold_steps={self.hold_steps}, d_warmup_steps={self.d_warmup_steps}"
        return text

    def _limits(self, dtype: torch.dtype):
        """This forward's (rmax_t, dmax_t): Python floats when nothing ramps, device
        tensors of ``dtype`` computed from ``num_batches_tracked`` while a schedule is set."""
        d_end = self.warmup_steps if self.d_warmup_steps is None else self.d_warmup_steps
        ramps = self.warmup_steps > 0 or d_end > 0 or self.hold_steps > 0
        t = self.num_batches_tracked.to(dtype) if ramps else 0
        return renorm_limits(
            self.rmax, self.dmax, self.warmup_steps, t, self.hold_steps, self.d_warmup_steps
        )

    def _renorm_train(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """Training forward with running statistics: stats, r/d, update, normalize."""
        mean, var, count = batch_stats(x)
        if group is None and count == 0:  # an empty batch: nothing to learn, nothing moves
            return normalize(x, self.weight, self.bias, mean, var, self.eps, total=0)
        if count <= 1 and (group is None or dist.get_world_size(group) < 2):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        total = count
        if group is not None:
            # a device tensor: an all-empty group keeps every buffer still by arithmetic
            # (functional.moved), not by a branch the host would have to read
            mean, var, total = sync_stats(mean, var, count, group)
        r, d, invstd = self._renorm_factors(mean, var, total)
        if group is None and (self.impl == "native" or (self.impl == "auto" and x.is_cuda)):
            return renorm_native(x, self.weight, self.bias, r, d, self.eps)
        return normalize(
            x,
            self.weight,
            self.bias,
            mean,
            var,
            self.eps,
            r=r,
            d=d,
            group=group,
            total=total,
            invstd=invstd,
        )

    def _renorm_factors(self, mean: torch.Tensor, var: torch.Tensor, total):
        """This step's r and d (clipped to the ramp's limits) from the batch's mean and
        biased variance over ``total`` values, and 1/sigma_B; moves the running stats and
        keeps the diagnostics.  No autograd history: r and d are constants to BRN."""
        eps = self.eps
        # Per-channel work is a handful of C-sized ops; on a slow-dispatch CPU each costs
        # ~5-10 us, so they are kept few and batched with _foreach ops.  Nothing here is
        # read by the host (see renorm_limits).
        with torch.no_grad():
            acc = mean.dtype
            rmax_t, dmax_t = self._limits(acc)
            run_mean, run_var = self.running_mean, self.running_var
            if run_mean.dtype != acc:
                run_mean, run_var = run_mean.to(acc), run_var.to(acc)
            # sigma_R from the running stats *before* this step's update.
            inv_sigma_r, invstd = torch._foreach_add([run_var, var], eps)
            torch._foreach_rsqrt_([inv_sigma_r, invstd])
            r = torch.div(inv_sigma_r, invstd)  # sigma_B / sigma_R
            d = torch.sub(mean, run_mean).mul_(inv_sigma_r)
            if isinstance(rmax_t, torch.Tensor):
                r.clamp_(rmax_t.reciprocal(), rmax_t)
                d.clamp_(-dmax_t, dmax_t)
            else:
                torch._foreach_clamp_min_([r, d], [1.0 / rmax_t, -dmax_t])
                torch._foreach_clamp_max_([r, d], [rmax_t, dmax_t])
            update_running(self, mean, var, total)
        self._keep_diagnostics(r, d, (rmax_t, dmax_t))
        return r, d, invstd

    def _keep_diagnostics(self, r: torch.Tensor, d: torch.Tensor, limits: tuple) -> None:
        """Keep this forward's r, d and clip limits for ``renorm_stats``.

        On CUDA they are copied into tensors that persist: a CUDA graph replays into the
        storage it captured, so rebinding attributes would leave the log reading the
        graph's tensors until an eager forward (precise BN's, at rmax 1 and dmax 0)
        rebinds them, and then reading that eager forward for the rest of the run.  On
        the CPU (no graphs) rebinding costs nothing and is kept."""
        kept = self.last_r
        if not self._diagnostics_in_place(r):
            self.last_r, self.last_d, self.last_limits = r, d, limits
            return
        if (
            kept is None
            or kept.shape != r.shape
            or kept.dtype != r.dtype
            or kept.device != r.device
        ):
            self.last_r, self.last_d = r.clone(), d.clone()
            self.last_limits = tuple(
                torch.zeros((), dtype=r.dtype, device=r.device) for _ in limits
            )
        else:
            self.last_r.copy_(r)
            self.last_d.copy_(d)
        for kept_limit, value in zip(self.last_limits, limits, strict=True):
            if isinstance(value, torch.Tensor):
                kept_limit.copy_(value)
            else:
                kept_limit.fill_(value)

    @staticmethod
    def _diagnostics_in_place(r: torch.Tensor) -> bool:
        return r.is_cuda

    def renorm_stats(self) -> dict[str, float]:
        """Clip diagnostics of the last training forward: how hard r and d are working.

        ``r_clipped``/``d_clipped``: fraction of channels at their clip limit (only
        meaningful once the limits exceed (1, 0)); ``r_dev``: mean |r - 1|;
        ``d_abs``: mean |d|.
        """
        if self.last_r is None:
            return {}
        r, d = self.last_r, self.last_d
        rmax_t, dmax_t = (float(v) for v in self.last_limits)  # a host read: log time only
        tol = 1e-6
        r_clip = (r >= rmax_t * (1 - tol)) | (r <= (1 / rmax_t) * (1 + tol))
        d_clip = d.abs() >= dmax_t * (1 - tol)
        return {
            "rmax_t": rmax_t,
            "dmax_t": dmax_t,
            "r_clipped": r_clip.float().mean().item(),
            "d_clipped": d_clip.float().mean().item(),
            "r_dev": (r - 1).abs().mean().item(),
            "d_abs": d.abs().mean().item(),
        }


def renorm_native(x, weight, bias, r, d, eps: float) -> torch.Tensor:
    """Batch Renorm's training output from native ops only: ``F.batch_norm`` in training
    mode (batch statistics) with r and d folded into its affine, ``w * r`` and
    ``b + w * d``.  r and d carry no gradient, so autograd gives exactly BRN's gradients
    (dx through the batch statistics scaled by r; dw = r * sum(dy x_hat) + d * sum(dy);
    db = sum(dy)) and stays in C++: no Python autograd.Function, which is what costs most
    on a GPU at small batch, and the step stays capturable in a CUDA graph.  The price is
    a second statistics pass inside the kernel, cheap on a GPU."""
    w = weight.to(r.dtype) if weight is not None else torch.ones_like(r)
    b = bias.to(d.dtype) if bias is not None else torch.zeros_like(d)
    param = weight.dtype if weight is not None else x.dtype
    w_eff, b_eff = (w * r).to(param), torch.addcmul(b, w, d).to(param)
    return F.batch_norm(x, None, None, w_eff, b_eff, True, 0.0, eps)


def renorm_diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Clip diagnostics (``renorm_stats``) of every Batch Renorm layer in ``model`` that
    has run a training forward, by module name, in module order.  Sync layers included;
    reading them does not change training."""
    return {
        name: stats
        for name, m in model.named_modules()
        if isinstance(m, _RenormMixin) and (stats := m.renorm_stats())
    }


class _BatchRenorm(_RenormMixin, _BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        impl: str = "auto",
        hold_steps: int = 0,
        d_warmup_steps: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self._init_renorm(rmax, dmax, warmup_steps, impl, hold_steps, d_warmup_steps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._renorm_extra_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats:
            return self._renorm_train(x)
        # Eval with running stats, or no running stats at all (then r=1, d=0 and this is
        # BatchNorm on batch statistics): exactly nn.BatchNorm's fused path.
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if not use_batch else None,
            self.running_var if not use_batch else None,
            self.weight,
            self.bias,
            use_batch,
            0.0,
            self.eps,
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input; drop-in for ``nn.BatchNorm1d``."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input; drop-in for ``nn.BatchNorm2d``."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    """Batch Renorm over (N, C, D, H, W) input; drop-in for ``nn.BatchNorm3d``."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim

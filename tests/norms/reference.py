"""Independent float64 references of the papers' formulas, written out op by op.

Nothing here imports ``norms``: the tests compare the library against these.
"""

from __future__ import annotations

import torch


def _dims_and_shape(x: torch.Tensor):
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def _ramp(t, start, end):
    """0 before ``start`` forwards, 1 from ``end`` on, linear in between."""
    if t < start:
        return 0.0
    if end <= start:
        return 1.0
    return min(1.0, (t - start) / (end - start))


def batch_renorm_step(
    x,
    weight,
    bias,
    state,
    *,
    eps,
    momentum,
    rmax,
    dmax,
    warmup_steps,
    hold_steps=0,
    d_warmup_steps=None,
):
    """One Batch Renorm training forward (Ioffe 2017, Algorithm 1).  Clip limits: plain BN
    (1, 0) for ``hold_steps`` forwards, then linear ramps ending at ``warmup_steps`` (r)
    and ``d_warmup_steps`` (d; default the same).

    ``state`` = dict(mean, var, nbt) is read (values before the update) and replaced by
    the updated running statistics.  Returns y, differentiable w.r.t. x, weight, bias,
    with r and d as constants (the paper's stop_gradient).
    """
    dims, shape = _dims_and_shape(x)
    n = x.numel() // x.shape[1]
    mu = x.mean(dims)
    var = ((x - mu.view(shape)) ** 2).mean(dims)  # biased
    sigma_b = torch.sqrt(var + eps)
    sigma_r = torch.sqrt(state["var"] + eps)
    t = state["nbt"]
    d_end = warmup_steps if d_warmup_steps is None else d_warmup_steps
    rmax_t = 1 + _ramp(t, hold_steps, warmup_steps) * (rmax - 1)
    dmax_t = _ramp(t, hold_steps, d_end) * dmax
    r = torch.clamp(sigma_b.detach() / sigma_r, 1 / rmax_t, rmax_t)
    d = torch.clamp((mu.detach() - state["mean"]) / sigma_r, -dmax_t, dmax_t)
    x_hat = (x - mu.view(shape)) / sigma_b.view(shape)
    y = weight.view(shape) * (r.view(shape) * x_hat + d.view(shape)) + bias.view(shape)
    nbt = t + 1
    f = 1.0 / nbt if momentum is None else momentum
    state.update(
        mean=(1 - f) * state["mean"] + f * mu.detach(),
        var=(1 - f) * state["var"] + f * var.detach() * n / (n - 1),  # unbiased
        nbt=nbt,
        r=r,
        d=d,
        limits=(rmax_t, dmax_t),
    )
    return y


def running_norm(x, weight, bias, mean, var, eps):
    """Eval-mode normalization with given statistics."""
    _, shape = _dims_and_shape(x)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(
        shape
    ) + bias.view(shape)


def weight_standardize(w, eps):
    """Qiao et al. 2019: per output channel, biased variance, eps inside the root."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(w)


def precise_stats(batches, stages, eps):
    """Average per-batch statistics of each norm's input in a chain of stages
    ``x -> f_i(x) -> norm_i (train mode: batch statistics) -> ...``.

    ``stages`` = [(f, weight, bias)]: f maps the previous activation to the norm's input.
    Returns [(mean, var)] per norm: the mean over batches of the per-batch mean and of
    the per-batch *unbiased* variance.
    """
    sums = [[0.0, 0.0] for _ in stages]
    k = 0
    for x in batches:
        k += 1
        h = x
        for i, (f, weight, bias) in enumerate(stages):
            z = f(h)
            dims, shape = _dims_and_shape(z)
            n = z.numel() // z.shape[1]
            mu = z.mean(dims)
            biased = ((z - mu.view(shape)) ** 2).mean(dims)
            sums[i][0] = sums[i][0] + mu
            sums[i][1] = sums[i][1] + biased * n / (n - 1)
            h = (z - mu.view(shape)) / torch.sqrt(biased.view(shape) + eps)
            h = h * weight.view(shape) + bias.view(shape)
    return [(m / k, v / k) for m, v in sums]

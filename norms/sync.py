"""Synchronized BatchNorm and Batch Renorm that run on every backend, gloo/CPU included.

SyncBatchNorm: Ioffe & Szegedy, 2015 ("Batch Normalization", arXiv:1502.03167) with the
statistics taken over the whole process group, as in MegDet (Peng et al., 2018,
arXiv:1711.07240) and ``torch.nn.SyncBatchNorm``.  ``torch.nn.SyncBatchNorm`` refuses CPU
tensors and DDP refuses it in CPU modules; these layers don't.

Conventions (both layers):

* training statistics are over the concatenation of every rank's batch: each rank sends
  (count, mean, biased var) and they are combined weighted by count, so uneven shards
  and ranks with 0 samples are exact.  An empty rank still takes part in every
  collective (forward all_gather, backward all_reduce), so nothing hangs.  When the whole
  group's batch is empty the output is empty and no buffer moves.
* forward output and input gradients equal ``nn.BatchNorm`` (resp. Batch Renorm) on the
  concatenated batch.  weight/bias gradients are each rank's share; their sum over ranks
  (what DDP's all-reduce produces, up to its averaging) is the single-process gradient.
* running_var takes the *unbiased* group-wide variance (total count - 1 in the
  denominator), as a single process on the concatenated batch would.
* reductions and the exchange happen in fp32 (fp64 for the exchange itself) also under
  autocast.
* eval, world size 1, or no initialized process group: the plain single-process layer,
  with no collective at all.

On CUDA with a non-gloo backend (NCCL), SyncBatchNorm runs ``torch.nn.SyncBatchNorm``'s
fused kernels (``batch_norm_stats`` / ``batch_norm_gather_stats_with_counts`` /
``batch_norm_elemt``); everywhere else, and for SyncBatchRenorm, the portable path of
``norms.functional`` runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNormFn
from torch.nn.modules.batchnorm import _BatchNorm

from norms.batch_renorm import _BatchRenorm, update_running
from norms.functional import batch_stats, normalize, sync_stats

__all__ = ["SyncBatchNorm", "SyncBatchRenorm", "resolve_group"]


def resolve_group(process_group=None):
    """The group to synchronize over, or None when there is nothing to synchronize with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


class _SyncMixin:
    process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _sync_bn_train(self, x: torch.Tensor, group) -> torch.Tensor:
        """Portable synchronized BatchNorm training forward (running stats optional).
        Nothing is read by the host: the group-wide count stays on the device."""
        mean, var, count = batch_stats(x)
        if count <= 1 and dist.get_world_size(group) < 2:  # torch's own check, local
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        mean, var, total = sync_stats(mean, var, count, group)
        if self.track_running_stats:
            with torch.no_grad():
                update_running(self, mean, var, total)  # an all-empty group moves nothing
        return normalize(x, self.weight, self.bias, mean, var, self.eps, group=group, total=total)


class SyncBatchNorm(_SyncMixin, _BatchNorm):
    """BatchNorm with statistics over a process group; any device, any backend.

    ``process_group=None`` means the default (WORLD) group.  Input is (N, C, *).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        group = resolve_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(x)  # _BatchNorm: the exact nn.BatchNorm path
        if x.is_cuda and dist.get_backend(group) != "gloo":
            return self._torch_fused(x, group)
        return self._sync_bn_train(x, group)

    def _torch_fused(self, x: torch.Tensor, group) -> torch.Tensor:
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        return _TorchSyncBatchNormFn.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps,
            factor,
            group,
            dist.get_world_size(group),
        )


class SyncBatchRenorm(_SyncMixin, _BatchRenorm):
    """Batch Renorm (see ``norms.batch_renorm``) with group-wide batch statistics.

    For runs where even the combined batch is small: mu_B and sigma_B come from every
    rank's samples, r and d from those and the (replicated) running statistics.
    """

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
        process_group=None,
        impl: str = "auto",
        hold_steps: int = 0,
        d_warmup_steps: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            rmax,
            dmax,
            warmup_steps,
            impl,
            hold_steps,
            d_warmup_steps,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        group = resolve_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(x)  # single-process Batch Renorm
        if self.track_running_stats:
            return self._renorm_train(x, group)
        return self._sync_bn_train(x, group)  # no running stats: r=1, d=0

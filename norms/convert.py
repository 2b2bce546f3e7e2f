"""Swap every BatchNorm-family layer of a model for another norm kind.

Sources: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, torchvision's
``FrozenBatchNorm2d`` and this package's BRN / SyncBN / SyncBRN.  The new layer inherits
eps, momentum, affine and track_running_stats (where its constructor takes them; explicit
keywords win), and carries weight, bias, running_mean, running_var, num_batches_tracked,
device, dtype, requires_grad and train/eval mode.  Among bn, brn, syncbn, syncbrn and
frozenbn the eval-mode output is therefore unchanged by a conversion.

``gn`` is different in kind: GroupNorm normalizes per sample, so running statistics have
nothing to transfer to and the output changes.  Only the per-channel affine (weight,
bias) is carried; the model has to be (fine-)tuned after converting to GN.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from norms.group_norm import choose_groups
from norms.registry import _NORMS, get_norm, norm_for_rank

__all__ = ["convert_norms", "is_batch_norm", "running_stat_layers"]

_INHERITED = ("eps", "momentum", "affine", "track_running_stats")


def _frozen_bn_class() -> type | None:
    # A FrozenBatchNorm2d can only exist once torchvision.ops.misc was imported, so
    # looking it up there keeps `import norms` free of torchvision.
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


def is_batch_norm(m: nn.Module) -> bool:
    frozen = _frozen_bn_class()
    return isinstance(m, _BatchNorm) or (frozen is not None and isinstance(m, frozen))


def running_stat_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of ``module`` that learn running statistics: BN, BRN, SyncBN, SyncBRN
    (and torch's own), not FrozenBatchNorm2d, not ``track_running_stats=False``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


def _input_rank(m: nn.Module) -> int:
    # The registry's per-rank classes (BatchNorm1d/3d, BatchRenorm1d/3d) say; 2d classes,
    # FrozenBatchNorm2d and the rank-agnostic sync layers are 2d.
    for spec in _NORMS.values():
        for rank, cls in spec.by_rank.items():
            if isinstance(cls, type) and isinstance(m, cls):
                return rank
    return 2


def _accepted(ctor, names) -> set[str]:
    params = inspect.signature(ctor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


def _convert_one(old: nn.Module, kind: str, kwargs: dict) -> nn.Module:
    num_features = (
        old.running_mean.shape[0] if old.running_mean is not None else old.weight.shape[0]
    )
    try:
        ctor = norm_for_rank(kind, _input_rank(old))
    except ValueError as e:
        raise ValueError(f"{e}: cannot replace {type(old).__name__}") from None
    if kind == "gn":
        kwargs = {"num_groups": choose_groups(num_features), **kwargs}
    inherited = {
        n: getattr(old, n, d) for n, d in zip(_INHERITED, (1e-5, 0.1, True, True), strict=True)
    }
    keep = _accepted(ctor, _INHERITED) - set(kwargs)
    new = ctor(num_features, **{n: inherited[n] for n in keep}, **kwargs)

    ref = next((t for t in (old.weight, old.running_mean) if t is not None), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if src is None or dst is None:
                continue
            dst.copy_(src)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
    new.train(old.training)
    return new


def convert_norms(module: nn.Module, kind: str, **kwargs) -> nn.Module:
    """Replace every BatchNorm-family layer in ``module`` (itself included) by ``kind``.

    ``kwargs`` go to the new layers' constructor (e.g. ``rmax=3.0`` for brn,
    ``process_group=pg`` for syncbn).  A layer shared by several parents is replaced by
    one shared new layer.  Returns the converted module (a new object only when
    ``module`` itself is a norm layer).  Unknown kinds raise ValueError listing the kinds.
    """
    get_norm(kind)  # validate before touching anything
    memo: dict[int, nn.Module] = {}

    def convert(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            memo[id(m)] = _convert_one(m, kind, dict(kwargs))
        return memo[id(m)]

    if is_batch_norm(module):
        return convert(module)
    for parent in list(module.modules()):
        # _modules, not named_children(): the latter hides a child registered twice.
        for name, child in list(parent._modules.items()):
            if is_batch_norm(child):
                setattr(parent, name, convert(child))
    return module

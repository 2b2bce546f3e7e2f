"""Short kind names -> norm-layer constructors, and what each kind is.

Every constructor takes ``num_features`` first and keywords after, like
``nn.BatchNorm2d``, so ``build_norm(kind, C, **kw)`` can build any of them.  Kinds are the
names used in configs and by the policy: bn, brn, syncbn, syncbrn, gn, frozenbn, none.

The registry is the one place that knows what each kind is: *BatchNorm-family* (it keeps
running statistics under BatchNorm's state_dict keys, so checkpoints move between them),
frozen, synchronized across ranks, Batch Renorm (it takes the ``norm.brn`` settings), and
which classes serve each input rank (``nn.BatchNorm1d/2d/3d``).  The policy, conversion,
the trainer and the benches ask it instead of keeping their own lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from norms.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from norms.group_norm import group_norm
from norms.sync import SyncBatchNorm, SyncBatchRenorm

__all__ = [
    "KindFacts",
    "kind_facts",
    "is_sync_kind",
    "is_renorm_kind",
    "register_norm",
    "unregister_norm",
    "build_norm",
    "available_norms",
    "get_norm",
    "is_batch_norm_kind",
    "learns_running_stats",
    "norm_for_rank",
]


@dataclass(frozen=True)
class KindFacts:
    """What a kind is, as the policy and the trainer need to know it."""

    batch_norm: bool  # BatchNorm's buffers and state_dict keys
    frozen: bool  # BatchNorm-family with fixed statistics (FrozenBatchNorm2d)
    sync: bool  # reduces its statistics over a process group
    renorm: bool  # Batch Renorm: takes rmax/dmax/momentum and the clip-limit ramp

    @property
    def learns_running_stats(self) -> bool:
        return self.batch_norm and not self.frozen


@dataclass(frozen=True)
class _Spec:
    ctor: Callable[..., nn.Module]
    facts: KindFacts
    # Input rank (1, 2, 3 for 1d/2d/3d) -> constructor, for kinds with one class per
    # rank; empty for rank-agnostic kinds (sync layers, gn, none).
    by_rank: dict[int, Callable[..., nn.Module]] = field(default_factory=dict)


_NORMS: dict[str, _Spec] = {}


def register_norm(
    name: str,
    *,
    override: bool = False,
    batch_norm: bool = False,
    frozen: bool = False,
    sync: bool = False,
    renorm: bool = False,
    by_rank: dict[int, Callable[..., nn.Module]] | None = None,
):
    """Decorator: ``@register_norm("mynorm")`` on a constructor ``f(num_features, **kw)``.

    ``batch_norm=True`` declares a BatchNorm-family kind (BatchNorm's buffers and keys),
    ``frozen=True`` one whose statistics never update, ``sync=True`` one that takes a
    ``process_group`` and reduces over it,
    ``renorm=True`` a Batch Renorm kind; ``by_rank`` maps input rank to the class that
    conversion uses for that rank.
    """

    def deco(ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not name or name != name.lower():
            raise ValueError(f"norm kind names are short lowercase strings, got {name!r}")
        if name in _NORMS and not override:
            raise ValueError(
                f"norm kind {name!r} is already registered "
                f"(to {_NORMS[name].ctor!r}); pass override=True to replace it"
            )
        facts = KindFacts(batch_norm, frozen, sync, renorm)
        _NORMS[name] = _Spec(ctor, facts, dict(by_rank or {}))
        return ctor

    return deco


def unregister_norm(name: str) -> None:
    """Remove a kind registered with ``register_norm`` (no-op if absent)."""
    _NORMS.pop(name, None)


def available_norms() -> list[str]:
    return sorted(_NORMS)


def _spec(kind: str) -> _Spec:
    try:
        return _NORMS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown norm kind {kind!r}; valid kinds: {', '.join(available_norms())}"
        ) from None


def get_norm(kind: str) -> Callable[..., nn.Module]:
    return _spec(kind).ctor


def kind_facts(kind: str) -> KindFacts:
    return _spec(kind).facts


def is_batch_norm_kind(kind: str) -> bool:
    """True for the BatchNorm family (bn, brn, syncbn, syncbrn, frozenbn)."""
    return _spec(kind).facts.batch_norm


def learns_running_stats(kind: str) -> bool:
    """True for the kinds whose layers update running statistics (bn, brn, syncbn,
    syncbrn): what precise BN recalibrates."""
    return _spec(kind).facts.learns_running_stats


def is_sync_kind(kind: str) -> bool:
    """True for the kinds that reduce statistics over ranks (syncbn, syncbrn)."""
    return _spec(kind).facts.sync


def is_renorm_kind(kind: str) -> bool:
    """True for Batch Renorm, local or synchronized (brn, syncbrn)."""
    return _spec(kind).facts.renorm


def norm_for_rank(kind: str, rank: int) -> Callable[..., nn.Module]:
    """The constructor of ``kind`` for inputs of ``rank`` (1d/2d/3d)."""
    spec = _spec(kind)
    if not spec.by_rank:
        return spec.ctor
    if rank not in spec.by_rank:
        ranks = "/".join(f"{r}d" for r in sorted(spec.by_rank))
        raise ValueError(f"{kind} exists only in {ranks}; cannot build a {rank}d layer")
    return spec.by_rank[rank]


def build_norm(kind: str, num_features: int, **kwargs) -> nn.Module:
    """Build the ``kind`` layer over ``num_features`` channels (2d variants for bn/brn)."""
    return get_norm(kind)(num_features, **kwargs)


def _identity(num_features: int, **_ignored) -> nn.Module:
    # "none" removes normalization; it accepts and ignores the other kinds' keywords so
    # that a conversion can pass the source layer's eps/momentum uniformly.
    return nn.Identity()


def _frozen_bn(num_features: int, eps: float = 1e-5) -> nn.Module:
    # Imported on first use: `import norms` must not import torchvision (its import is
    # heavy, and in 2-process gloo jobs it alone makes exit abort now and then).
    from torchvision.ops import FrozenBatchNorm2d

    return FrozenBatchNorm2d(num_features, eps=eps)


register_norm(
    "bn",
    batch_norm=True,
    by_rank={1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
)(nn.BatchNorm2d)
register_norm(
    "brn",
    batch_norm=True,
    renorm=True,
    by_rank={1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
)(BatchRenorm2d)
register_norm("syncbn", batch_norm=True, sync=True)(SyncBatchNorm)
register_norm("syncbrn", batch_norm=True, sync=True, renorm=True)(SyncBatchRenorm)
register_norm("frozenbn", batch_norm=True, frozen=True, by_rank={2: _frozen_bn})(_frozen_bn)
register_norm("gn")(group_norm)
register_norm("none")(_identity)

"""Short kind names -> norm-layer constructors.

Every constructor takes ``num_features`` first and keywords after, like
``nn.BatchNorm2d``, so ``build_norm(kind, C, **kw)`` can build any of them.  Kinds are the
names used in configs and by the policy: bn, brn, syncbn, syncbrn, gn, frozenbn, none.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from norms.batch_renorm import BatchRenorm2d
from norms.group_norm import group_norm
from norms.sync import SyncBatchNorm, SyncBatchRenorm

__all__ = ["register_norm", "build_norm", "available_norms", "get_norm"]

_NORMS: dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str, *, override: bool = False):
    """Decorator: ``@register_norm("mynorm")`` on a constructor ``f(num_features, **kw)``."""

    def deco(ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not name or name != name.lower():
            raise ValueError(f"norm kind names are short lowercase strings, got {name!r}")
        if name in _NORMS and not override:
            raise ValueError(
                f"norm kind {name!r} is already registered "
                f"(to {_NORMS[name]!r}); pass override=True to replace it"
            )
        _NORMS[name] = ctor
        return ctor

    return deco


def available_norms() -> list[str]:
    return sorted(_NORMS)


def get_norm(kind: str) -> Callable[..., nn.Module]:
    try:
        return _NORMS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown norm kind {kind!r}; valid kinds: {', '.join(available_norms())}"
        ) from None


def build_norm(kind: str, num_features: int, **kwargs) -> nn.Module:
    """Build the ``kind`` layer over ``num_features`` channels (2d variants for bn/brn)."""
    return get_norm(kind)(num_features, **kwargs)


def _identity(num_features: int, **_ignored) -> nn.Module:
    # "none" removes normalization; it accepts and ignores the other kinds' keywords so
    # that a conversion can pass the source layer's eps/momentum uniformly.
    return nn.Identity()


register_norm("bn")(nn.BatchNorm2d)
register_norm("brn")(BatchRenorm2d)
register_norm("syncbn")(SyncBatchNorm)
register_norm("syncbrn")(SyncBatchRenorm)
register_norm("gn")(group_norm)
register_norm("frozenbn")(FrozenBatchNorm2d)
register_norm("none")(_identity)

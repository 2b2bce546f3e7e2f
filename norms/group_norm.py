"""Group Normalization (Wu & He, 2018, https://arxiv.org/abs/1803.08494).

GN normalizes each sample over groups of channels, so it does not depend on the batch
size at all: with G groups of C/G channels, per sample n and group g,

    y = (x - mean_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c      (biased var)

G=1 is LayerNorm over (C, H, W); G=C is InstanceNorm.  The paper's default is G=32;
layers whose width 32 does not divide take the largest preferred divisor instead
(``choose_groups``).  The layer itself is ``torch.nn.GroupNorm``; this module only picks
G and checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["choose_groups", "group_norm"]

DEFAULT_GROUPS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)


def choose_groups(num_channels: int, preferred: Sequence[int] = DEFAULT_GROUPS) -> int:
    """The first of ``preferred`` that divides ``num_channels`` (24->8, 48->16, 64->32)."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got num_channels={num_channels}")
    for g in preferred:
        if g >= 1 and num_channels % g == 0:
            return g
    raise ValueError(
        f"none of the preferred group counts {tuple(preferred)} divides num_channels={num_channels}"
    )


def group_norm(
    num_features: int,
    num_groups: int | None = None,
    eps: float = 1e-5,
    affine: bool = True,
    device=None,
    dtype=None,
) -> nn.GroupNorm:
    """``nn.GroupNorm`` over ``num_features`` channels; ``num_groups=None`` chooses it."""
    if num_groups is None:
        num_groups = choose_groups(num_features)
    elif num_groups < 1 or num_features % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}")
    return nn.GroupNorm(
        num_groups, num_features, eps=eps, affine=affine, device=device, dtype=dtype
    )

"""Fixed canvases for a detector's padded batches, so a few CUDA graphs serve them all.

torchvision's transform resizes every training image so that its shorter side is at most
max(``data.min_size``) and its longer side at most ``data.max_size``, then pads the batch
to a multiple of 32.  The aspect-ratio grouped sampler (``trainer.data.grouping``) makes a
batch all landscape (or square) or all portrait.  So two canvases hold every grouped
batch, whatever the scale drawn and the aspect ratio:

* landscape: round32(max min_size) high x round32(max_size) wide;
* portrait: the same, transposed (one canvas when the two coincide).

Two, not more: torchvision draws the scale per image, so a batch's padded shape is set by
its largest image and no finer split (per scale, per aspect band) holds every batch of
that split; each extra canvas is another capture and more graph memory.  A batch that
fits neither (a mixed leftover batch at an epoch's end) runs eagerly and is counted.

On a canvas, the prepared network (``norms.region``) normalizes over the batch's own
padded region and keeps the rest zero, so the features and head outputs cropped back
(``crop``) are the ones the batch alone gives: the graph changes no statistic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from norms.region import valid_size
from trainer.sizing import SIZE_DIVISIBLE, Sizing

__all__ = ["canvases", "crop", "fit", "pad_to"]


def _round(n: int) -> int:
    return -(-n // SIZE_DIVISIBLE) * SIZE_DIVISIBLE


def canvases(sizing: Sizing) -> list[tuple[int, int]]:
    """The (H, W) canvases for ``sizing``'s training batches: landscape, portrait and the
    square that holds a mixed batch."""
    short, long = _round(max(sizing.min_size)), _round(sizing.max_size)
    short = min(short, long)  # a max_size below min_size caps both sides
    return [(long, long)] if short == long else [(short, long), (long, short), (long, long)]


def fit(hw: tuple[int, int], options: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The smallest canvas that holds a padded batch of ``hw``, or None."""
    holds = [c for c in options if hw[0] <= c[0] and hw[1] <= c[1]]
    return min(holds, key=lambda c: c[0] * c[1]) if holds else None


def pad_to(x: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, h, w) with zeros below and to the right, to (N, C, *canvas)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, canvas[1] - w, 0, canvas[0] - h))


def crop(
    features: list[torch.Tensor],
    head: dict[str, torch.Tensor],
    canvas: tuple[int, int],
    hw: tuple[int, int],
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The canvas outputs as the batch of padded size ``hw`` alone would give them: each
    feature map's valid part, and each head output's (N, sum_l H_l W_l A, K) rows of the
    valid positions (torchvision's heads flatten level by level in (H, W, A) order)."""
    valid = [
        tuple(valid_size(c, e, s) for c, e, s in zip(canvas, hw, f.shape[-2:], strict=True))
        for f in features
    ]
    cropped = [f[..., :h, :w] for f, (h, w) in zip(features, valid, strict=True)]
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    out = {}
    for key, t in head.items():
        n, rows, k = t.shape
        a = rows // sum(sizes)
        levels = t.split([s * a for s in sizes], dim=1)
        parts = [
            lvl.reshape(n, f.shape[-2], f.shape[-1], a, k)[:, :h, :w].reshape(n, -1, k)
            for lvl, f, (h, w) in zip(levels, features, valid, strict=True)
        ]
        out[key] = torch.cat(parts, dim=1)
    return cropped, out

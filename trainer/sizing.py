"""Detection input sizing, as detectron2 and torchvision define it: each image is resized,
keeping its aspect ratio, so that its shorter side is ``min_size`` unless its longer side
would then exceed ``max_size`` (then the longer side is ``max_size``); a batch is padded
to a multiple of 32 (torchvision's ``size_divisible``).

* ``min_size`` may be several sizes: one is drawn per training image (torchvision's
  ``GeneralizedRCNNTransform``; detectron2's ``ResizeShortestEdge`` choice mode), the
  standard multi-scale training.  Eval and predict use ``test_size``.
* ``smallest_map`` gives the fewest positions a feature map at a stride can have for
  this sizing, over the aspect ratios the data can have: what the norm policy counts
  values on.  A padded batch is at least as large as its largest image, so the smallest
  single resized image is the worst case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SIZE_DIVISIBLE", "Sizing", "UNKNOWN_ASPECTS"]

SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads batches to this
# Long side / short side assumed when the data's own sizes are not known: square up to
# 2:1 (most photos are 4:3 or 16:9).
UNKNOWN_ASPECTS = (1.0, 4 / 3, 16 / 9, 2.0)


@dataclass(frozen=True)
class Sizing:
    min_size: tuple[int, ...]  # shorter side when training, one drawn per image
    max_size: int  # longer side at most
    test_size: int  # shorter side for eval and predict

    @classmethod
    def square(cls, size: int) -> Sizing:
        """Every image resized to ``size`` x ``size`` (square inputs of any size)."""
        return cls((size,), size, size)

    def resized(self, short: float, long: float, min_size: int) -> tuple[int, int]:
        """(short, long) after the resize, before padding (torchvision's rounding)."""
        scale = min(min_size / short, self.max_size / long)
        return math.floor(short * scale), math.floor(long * scale)

    def smallest_map(self, stride: int, aspects: Iterable[float]) -> tuple[int, int]:
        """(H, W) of the smallest map at ``stride`` over the training sizes and the given
        long/short aspect ratios (both orientations give the same count)."""
        best = None
        for size in self.min_size:
            for aspect in aspects:
                short, long = self.resized(1.0, aspect, size)
                pad = [-(-side // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in (short, long)]
                hw = tuple(max(1, -(-side // stride)) for side in pad)
                if best is None or hw[0] * hw[1] < best[0] * best[1]:
                    best = hw
        return best

    def describe(self) -> dict:
        return {
            "min_size": list(self.min_size),
            "max_size": self.max_size,
            "test_size": self.test_size,
        }

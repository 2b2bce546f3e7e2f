"""The one place that knows the model zoo: torchvision ResNet backbones and the
architectures built on them.  No torch import, so config validation stays cheap."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKBONES", "DETECTION_ARCHS", "CLASSIFICATION_ARCHS", "backbone_of", "task_of"]


@dataclass(frozen=True)
class Backbone:
    widths: tuple[int, ...]  # channel widths of its norm layers (checked against GN groups)
    expansion: int  # block expansion: stage outputs are (64, 128, 256, 512) x expansion


BACKBONES = {
    "resnet18": Backbone((64, 128, 256, 512), 1),
    "resnet34": Backbone((64, 128, 256, 512), 1),
    "resnet50": Backbone((64, 128, 256, 512, 1024, 2048), 4),
}
_DETECTION_BACKBONES = ("resnet18", "resnet50")

DETECTION_ARCHS = tuple(
    f"{head}_{name}_fpn" for head in ("fcos", "retinanet") for name in _DETECTION_BACKBONES
)
CLASSIFICATION_ARCHS = tuple(BACKBONES)


def backbone_of(arch: str) -> str:
    """The torchvision ResNet name inside ``arch`` (e.g. fcos_resnet50_fpn -> resnet50)."""
    if arch in BACKBONES:
        return arch
    return next(name for name in BACKBONES if f"_{name}_" in arch)


def task_of(arch: str) -> str:
    return "detection" if arch in DETECTION_ARCHS else "classification"

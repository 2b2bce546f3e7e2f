"""The one place that knows the model zoo: torchvision ResNet backbones and the
architectures built on them.  No torch import, so config validation stays cheap."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKBONES",
    "DETECTION_ARCHS",
    "CLASSIFICATION_ARCHS",
    "HEAD_STRIDE",
    "backbone_of",
    "task_of",
]


@dataclass(frozen=True)
class Backbone:
    widths: tuple[int, ...]  # channel widths of its norm layers (checked against GN groups)
    expansion: int  # block expansion: stage outputs are (64, 128, 256, 512) x expansion
    # Of its last stage, the smallest feature map a norm layer sees: a square input of S
    # pixels reaches it as ceil(S / stride) squared (every stride-2 layer pads).
    stride: int = 32


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
# The detectors' FPN normalizes P3-P5 (P5 at the backbone's stride); the head runs on
# P3-P7 (LastLevelP6P7), so its smallest map is P7's, at stride 128.
HEAD_STRIDE = 128


def backbone_of(arch: str) -> str:
    """The torchvision ResNet name inside ``arch`` (e.g. fcos_resnet50_fpn -> resnet50)."""
    if arch in BACKBONES:
        return arch
    return next(name for name in BACKBONES if f"_{name}_" in arch)


def task_of(arch: str) -> str:
    return "detection" if arch in DETECTION_ARCHS else "classification"

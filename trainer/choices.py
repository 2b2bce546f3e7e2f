"""The configuration's closed sets of words, one ``Word`` enum each (norms.words):
OmegaConf refuses any other word, naming the key and the choices, and a member compares
equal to its word.  Each member's name is its value, so YAML round-trips."""

from __future__ import annotations

from norms.words import Word
from trainer.archs import CLASSIFICATION_ARCHS, DETECTION_ARCHS

__all__ = [
    "Amp",
    "Arch",
    "Backend",
    "BadBoxes",
    "CheckImages",
    "Dataset",
    "Device",
    "Optimizer",
    "WandbMode",
]


class Device(Word):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Dataset(Word):
    shapes = "shapes"
    scenes = "scenes"
    coco = "coco"
    imagefolder = "imagefolder"


class BadBoxes(Word):
    drop = "drop"
    error = "error"


class CheckImages(Word):
    header = "header"
    full = "full"


class Optimizer(Word):
    sgd = "sgd"
    adamw = "adamw"


class Amp(Word):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(Word):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Backend(Word):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


Arch = Word("Arch", [(a, a) for a in DETECTION_ARCHS + CLASSIFICATION_ARCHS])

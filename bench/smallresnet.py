"""The classification study's network and data: ``SmallResNet`` with each norm line's
layers, and the shapes classification set as one tensor file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from norms import available_norms, convert_convs_to_ws, convert_norms, is_renorm_kind
from trainer.data.classification import IndexedImageFolder
from trainer.data.shapes import ensure_shapes

__all__ = ["BASE_KIND", "BRN_VARIANTS", "SmallResNet", "WIDTHS", "build", "load_tensors"]

WIDTHS = (16, 32, 64, 128, 128)


def load_tensors(root: Path, num_train: int, num_val: int, size: int) -> Path:
    """Shapes classification data as one tensor file (decoded once, shared by workers)."""
    folder = ensure_shapes(root, "classification", num_train, num_val, size)
    cache = folder / "tensors.pt"
    if not cache.is_file():
        blob = {}
        for split in ("train", "val"):
            ds = IndexedImageFolder(folder / split, train=False)
            xs, ys = zip(*[ds[i][:2] for i in range(len(ds))], strict=True)
            blob[split] = (torch.stack(xs), torch.tensor(ys))
        tmp = cache.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    return cache


class SmallResNet(nn.Sequential):
    """A small ResNet for 16 px inputs: a 3x3 stem, then one torchvision BasicBlock per
    stage at widths 16-32-64-128-128 (1.1 M parameters, 13 norm layers).  Its fifth stage
    works at 1x1, as ResNet-50's last stage does on 32 px inputs (or an MLP head's BN1d):
    there BatchNorm normalizes each channel over just B values, which is where its
    small-batch weakness is unmistakable.  Small enough for the grid on 2 CPU cores."""

    def __init__(self, num_classes: int = 3, widths=(16, 32, 64, 128, 128)):
        from torchvision.models.resnet import BasicBlock

        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(BasicBlock(cin, w, stride, down))
            cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        super().__init__(*layers)


# Batch Renorm variants, as fractions of the run's steps (the layer counts forwards):
# "brn" ramps both limits over the first quarter; "brn_m01" is the same with momentum
# 0.01 (Keras's renorm_momentum=0.99); "brn_paper" is the paper's Inception-v3 shape
# (plain BN for 5k of 40k steps, dmax open by 25k, rmax by 40k), scaled to the run.
BRN_VARIANTS = {
    "brn": dict(momentum=0.1, hold=0.0, r_end=0.25, d_end=0.25),
    "brn_m01": dict(momentum=0.01, hold=0.0, r_end=0.25, d_end=0.25),
    "brn_paper": dict(momentum=0.01, hold=0.125, r_end=1.0, d_end=0.625),
}
BASE_KIND = {"syncbrn": "syncbrn", **{v: "brn" for v in BRN_VARIANTS}}


def build(norm: str, steps: int, widths=WIDTHS) -> nn.Module:
    model = SmallResNet(widths=widths)
    kind = BASE_KIND.get(norm, norm)
    if kind in available_norms() and is_renorm_kind(kind):
        # SyncBRN trains with the trainer's norm.brn defaults: brn_m01's.
        v = BRN_VARIANTS["brn_m01" if norm == "syncbrn" else norm]
        return convert_norms(
            model,
            kind,
            rmax=3.0,
            dmax=5.0,
            momentum=v["momentum"],
            hold_steps=round(v["hold"] * steps),
            warmup_steps=round(v["r_end"] * steps),
            d_warmup_steps=round(v["d_end"] * steps),
        )
    if kind == "gn":
        # 8 groups divide every width (2-16 channels per group).
        return convert_convs_to_ws(convert_norms(model, "gn", num_groups=8))
    if kind == "syncbn":
        return convert_norms(model, "syncbn")
    return model  # nn.BatchNorm2d

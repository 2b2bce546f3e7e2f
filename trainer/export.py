"""Export a trained run as a model that needs only torch + torchvision.

The norms become plain modules first: Batch Renorm, SyncBN and SyncBRN (and frozen BN)
become ``nn.BatchNorm2d`` holding the checkpoint's running statistics (precise BN's,
where the run used it); ``WSConv2d`` becomes ``nn.Conv2d`` with the standardized weight
baked in.  In eval mode the plain model computes what the trained one does.  Written:

* ``model.pt2`` (classifiers): a ``torch.export`` program taking any batch of images
  at the training size (``torch.export.load(path).module()``; no normpilot needed), the
  recommended format where it exists;
* ``model.ts``: a TorchScript program (``torch.jit.load`` it; no normpilot needed), for
  every model.  Detectors get no ``.pt2``: torch.export cannot trace torchvision's
  detection models end to end on dynamic sizes (its transform's resize branches on which
  side binds, its NMS on the number of boxes, and its padding and anchors specialize to
  one size), so TorchScript, deprecated but working, is their program;
* ``weights.pt``: the plain model's state_dict, weights only;
* ``model.json``: how to rebuild the plain model (architecture, sizes, norm per part,
  the dataset's categories) and what each file is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from norms import (
    WSConv2d,
    convert_norms,
    is_batch_norm,
    is_batch_norm_kind,
    standardize_weight,
)
from norms.per_level import drop_reset_hooks
from trainer.inference import Run

__all__ = ["plain_model", "export_run"]

# Why a detector has no model.pt2 (in model.json, so a user finds the reason there).
NO_PT2_DETECTOR = (
    "torch.export cannot trace torchvision's detection models end to end on dynamic image "
    "sizes (data-dependent resize, NMS and padding); use model.ts"
)


@torch.no_grad()
def plain_model(model: nn.Module) -> nn.Module:
    """``model`` (modified in place and returned) with only torch modules as norms."""
    if any(is_batch_norm(m) for m in model.modules()):
        model = convert_norms(model, "bn")
    drop_reset_hooks(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, WSConv2d):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    child.padding_mode,
                ).to(child.weight.device, child.weight.dtype)
                conv.weight.copy_(standardize_weight(child.weight, child.eps))
                if child.bias is not None:
                    conv.bias.copy_(child.bias)
                setattr(parent, name, conv)
    return model.eval()


def export_run(run: Run, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain = plain_model(run.model.cpu())
    files = {"program": out / "model.ts", "weights": out / "weights.pt", "spec": out / "model.json"}
    torch.save(plain.state_dict(), files["weights"])
    detection = run.dataset["task"] == "detection"
    if not detection:
        files["exported"] = out / "model.pt2"
        torch.export.save(_export_classifier(plain, run.cfg.data.image_size), files["exported"])
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what loads with
        # nothing but torch (and runs torchvision's detection models, which torch.export
        # does not yet cover end to end).
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(plain).save(str(files["program"]))
    cfg = run.cfg
    kinds = {part: "bn" if is_batch_norm_kind(k) else k for part, k in run.kinds.items()}
    spec = {
        "program": files["program"].name,
        "exported_program": None if detection else files["exported"].name,
        "exported_program_missing": NO_PT2_DETECTOR if detection else None,
        "weights": files["weights"].name,
        "load": "import torchvision (registers its ops, e.g. nms); torch.jit.load('model.ts'); "
        "inputs as in torchvision (detection: a list of 3xHxW float images in [0, 1], "
        "outputs (losses, detections); classification: a normalized NCHW batch -> logits)"
        + ("" if detection else "; or torch.export.load('model.pt2').module()(batch)"),
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,
        "image_size": cfg.data.image_size,
        "sizing": cfg.data.sizing().describe() if run.dataset["task"] == "detection" else None,
        "anchor_sizes": cfg.model.anchor_sizes,
        "fpn_channels": cfg.model.fpn_channels,
        "norms": kinds,
        "weight_standardization": "baked into the convolution weights",
        "task": run.dataset["task"],
        "categories": run.dataset["categories"],
        "normalize": None
        if run.dataset["task"] == "detection"
        else {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "source_checkpoint": str(run.checkpoint),
        "step": run.step,
    }
    files["spec"].write_text(json.dumps(spec, indent=2) + "\n")
    return files


def _export_classifier(model: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """The classifier as an ExportedProgram taking any batch of ``image_size`` x
    ``image_size`` images, the size it was trained at.  (Dynamic height and width trace
    too, but only from 33 px, where the last stage stops being 1 x 1: a program that
    refused the training size itself would be worse.)"""
    example = torch.rand(2, 3, image_size, image_size)
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    return torch.export.export(model, (example,), dynamic_shapes=(dims,))

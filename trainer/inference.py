"""After training: a run's checkpoint back as a model, and predictions on new images.

``load_run`` reads a run folder (its config.yaml, newest valid checkpoint or a given
one) and rebuilds the model exactly as trained: the norm kinds come from the checkpoint's
policy record, not from a new policy decision (which could differ with the world size),
and the weights carry the statistics the checkpoint holds (precise BN where enabled).
"""

from __future__ import annotations

import glob
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from norms import NormChoice
from trainer.checkpoint import CheckpointError, load_latest, read_checkpoint
from trainer.config import Config, ConfigError, load_config
from trainer.training import model_from_config

__all__ = ["Run", "load_run", "read_images", "predict"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Run:
    cfg: Config
    model: nn.Module  # eval mode, on the device
    checkpoint: Path
    step: int
    dataset: dict  # task, image_size, categories (saved at training time)
    kinds: dict[str, str]  # norm kind per part, as trained


def load_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    overrides: list[str] | tuple = (),
    device: str = "cpu",
) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if checkpoint is None:
        found = load_latest(run_dir / "checkpoints")
        if found is None:
            raise CheckpointError(f"--run {run_dir}: no readable checkpoint in checkpoints/")
        ckpt, path = found
    else:
        path = Path(checkpoint)
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"--checkpoint: {e}") from None
    old_cfg = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    old_arch = old_cfg.get("model", {}).get("arch")
    if old_arch != cfg.model.arch:
        raise CheckpointError(
            f"checkpoint {path} is from model.arch={old_arch!r}, the run {run_dir} is "
            f"model.arch={cfg.model.arch!r}"
        )
    plan = {
        part: NormChoice(part, p["kind"], p["ws"]) for part, p in ckpt["policy"]["parts"].items()
    }
    model = model_from_config(cfg, plan)  # the checkpoint holds every weight
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # shapes or keys differ: another num_classes, fpn_channels
        raise CheckpointError(
            f"checkpoint {path} does not fit the model of {run_dir}/config.yaml "
            f"(model.num_classes={cfg.model.num_classes}, model.fpn_channels="
            f"{cfg.model.fpn_channels}): {str(e).splitlines()[0]}"
        ) from None
    dataset = ckpt.get("dataset") or {
        "task": cfg.model.task,
        "image_size": cfg.data.image_size,
        "categories": [{"id": i + 1, "name": str(i + 1)} for i in range(cfg.model.num_classes)],
    }
    if ckpt["policy"].get("precise_bn", {}).get("enabled") and ckpt.get("bn_ema") is None:
        # A stop request saves without the recalibration pass (it must be fast); precise
        # BN runs when that run resumes.  Say so: these statistics are the noisier ones.
        warnings.warn(
            f"{path} was saved at a stop request, before precise BN: its BN statistics are "
            f"training's moving averages, not the recalibrated ones (resume the run to "
            f"finish it, or use an earlier checkpoint with --checkpoint)",
            stacklevel=2,
        )
    kinds = {part: c.kind for part, c in plan.items()}
    return Run(cfg, model.to(device).eval(), path, ckpt["step"], dataset, kinds)


def image_paths(inputs: list[str]) -> list[Path]:
    """Files, directories (their images, sorted) and glob patterns -> image files."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            matches = [Path(m) for m in sorted(glob.glob(item))]
            if not matches:
                raise ValueError(f"no image matches {item!r}")
            paths += [q for q in matches if q.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise ValueError(f"no images found in {' '.join(inputs)}")
    return paths


def read_images(paths: list[Path]) -> list[torch.Tensor]:
    from torchvision.transforms.v2 import functional as TF

    from trainer.data.images import load_rgb

    images = []
    for p in paths:
        image = TF.to_image(load_rgb(p))
        # A plain tensor (not a tv_tensors.Image): what a deployed model is given.
        images.append(TF.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor))
    return images


@torch.no_grad()
def predict(run: Run, images: list[torch.Tensor], device: str = "cpu", top_k: int = 3) -> list:
    """Detection: per image the model's output dict (boxes xyxy in input pixels, labels,
    scores).  Classification: per image the top-k (class index, probability)."""
    if run.dataset["task"] == "detection":
        return run.model([im.to(device) for im in images])
    from torchvision.transforms.v2 import functional as TF

    from trainer.data.classification import MEAN, STD

    size = run.dataset["image_size"]
    batch = torch.stack(
        [TF.normalize(TF.resize(im, [size, size], antialias=True), MEAN, STD) for im in images]
    )
    probs = run.model(batch.to(device)).softmax(1).cpu()
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [list(zip(i.tolist(), p.tolist(), strict=True)) for p, i in zip(*top, strict=True)]

"""Evaluation: COCO mAP through pycocotools for detection, top-1 for classification.

Every rank evaluates its shard; results are gathered and de-duplicated by image id /
sample index (DistributedSampler pads the last shard with repeats), then scored once.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist

from trainer.checkpoint import unwrap
from trainer.data import eval_loader

__all__ = ["evaluate", "evaluate_detection", "evaluate_classification", "coco_results"]


def coco_results(output: dict, image_id: int, label_to_cat: dict) -> list[dict]:
    """One image's detections as COCO results: xywh boxes at full float precision (no
    rounding: mAP@[.5:.95] moved by up to 3e-4 with 0.01 px rounding), the dataset's own
    category ids.  The model's output is not modified."""
    from torchvision.ops import box_convert

    xywh = box_convert(output["boxes"].detach().cpu(), "xyxy", "xywh")
    return [
        {
            "image_id": image_id,
            "category_id": label_to_cat[int(lab)],
            "bbox": [float(v) for v in box],
            "score": float(s),
        }
        for box, lab, s in zip(xywh, output["labels"], output["scores"], strict=True)
        if int(lab) in label_to_cat  # 0 is the (never-trained) background
    ]


def evaluate(net, val_ds, env, *, task: str, batch: int, workers: int) -> dict[str, float]:
    """Evaluate ``net`` (bare, DDP or compiled) on ``val_ds`` across ranks; the model is
    left in the mode it was in."""
    loader = eval_loader(
        val_ds,
        batch=batch,
        world_size=env.world_size,
        rank=env.rank,
        workers=workers,
        task=task,
        pin_memory=env.device.type == "cuda",
    )
    model = unwrap(net)
    was_training = model.training
    try:
        if task == "detection":
            return evaluate_detection(model, loader, val_ds, env.device, env.world_size)
        return evaluate_classification(model, loader, env.device, env.world_size)
    finally:
        model.train(was_training)


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def evaluate_detection(model, loader, dataset, device, world_size: int) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    detections = {}
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for out, tgt in zip(outputs, targets, strict=True):
            detections[tgt["image_id"]] = coco_results(out, tgt["image_id"], dataset.label_to_cat)
    merged: dict[int, list] = {}
    for part in _gather(detections, world_size):
        merged.update(part)  # a padded duplicate image overwrites itself, never counts twice
    results = [d for dets in merged.values() for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()  # the dataset's checked copy of its annotation file (area filled in)
        gt.dataset = dataset.coco_gt
        gt.createIndex()
        if not results:
            return {"mAP": 0.0, "mAP50": 0.0, "images": len(merged)}
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.params.imgIds = sorted(merged)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        "mAP": float(coco_eval.stats[0]),
        "mAP50": float(coco_eval.stats[1]),
        "images": len(merged),
    }


@torch.no_grad()
def evaluate_classification(model, loader, device, world_size: int) -> dict[str, float]:
    model.eval()
    correct: dict[int, bool] = {}
    for images, labels, index in loader:
        pred = model(images.to(device)).argmax(1).cpu()
        correct.update(zip(index.tolist(), (pred == labels).tolist(), strict=True))
    merged: dict[int, bool] = {}
    for part in _gather(correct, world_size):
        merged.update(part)
    return {"top1": sum(merged.values()) / max(1, len(merged)), "images": len(merged)}

"""Datasets and loaders: the embedded shapes data or a user's COCO / ImageFolder set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainer.data.classification import IndexedImageFolder
from trainer.data.coco import CocoDetection, collate_detection, read_annotations
from trainer.data.errors import DataError
from trainer.data.grouping import GroupedBatches, aspect_groups
from trainer.data.images import DEFAULT_MAX_PIXELS
from trainer.data.scenes import ensure_scenes, scenes_dir
from trainer.data.scenes import nominal_aspects as scenes_aspects
from trainer.data.shapes import ensure_shapes, shapes_dir

__all__ = [
    "DataError",
    "build_datasets",
    "check_batch_fits",
    "dataset_root",
    "describe",
    "eval_loader",
    "train_aspects",
    "train_loader",
]


def build_datasets(
    dataset: str,
    root: str,
    task: str,
    *,
    image_size: int,
    num_train: int,
    num_val: int,
    seed: int,
    generate: bool,
    bad_boxes: str = "drop",
    check_images: str = "header",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    color_jitter: float = 0.0,
):
    """(train, val) datasets.  ``generate``: this process may create the embedded data
    (local rank 0; the others wait at a barrier and then find it complete)."""
    if dataset == "shapes" and generate:
        ensure_shapes(root, task, num_train, num_val, image_size, seed)
    elif dataset == "scenes" and generate:
        ensure_scenes(root, num_train, num_val, image_size, seed)
    root = dataset_root(dataset, root, task, image_size, num_train, num_val, seed)
    if not root.exists():
        raise DataError(f"dataset root {root} (data.root) does not exist")
    if task == "detection":
        make = lambda split, train: CocoDetection(  # noqa: E731
            root / split,
            root / "annotations" / f"instances_{split}.json",
            train=train,
            seed=seed,
            bad_boxes=bad_boxes,
            check_images=check_images,
            max_image_pixels=max_image_pixels,
            color_jitter=color_jitter if train else 0.0,
        )
    else:
        make = lambda split, train: IndexedImageFolder(root / split, train=train, seed=seed)  # noqa: E731
    return make("train", True), make("val", False)


def dataset_root(
    dataset: str, root: str, task: str, image_size: int, num_train: int, num_val: int, seed: int
) -> Path:
    """The folder the dataset's files are in: a generated set's own subfolder of
    ``data.root`` (keyed by its parameters), else ``data.root`` itself."""
    if dataset == "shapes":
        return shapes_dir(root, task, num_train, num_val, image_size, seed)
    if dataset == "scenes":
        return scenes_dir(root, num_train, num_val, image_size, seed)
    return Path(root)


def train_aspects(dataset: str, root: str | Path) -> tuple[float, ...] | None:
    """The long/short ratios of the detection training images, from the widths and
    heights the COCO annotation file lists (None when it cannot be read: the caller
    assumes).  The generated shapes are square; generated scenes not yet written have
    their generator's aspect ratios.  ``root``: the dataset's folder (``dataset_root``)."""
    if dataset == "shapes":
        return (1.0,)
    try:
        ann = Path(root) / "annotations" / "instances_train.json"
        images = read_annotations(ann, hand_over=True)["images"]
        ratios = {
            round(max(im["width"], im["height"]) / min(im["width"], im["height"]), 2)
            for im in images
        }
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return scenes_aspects() if dataset == "scenes" else None
    return tuple(sorted(ratios)) or None


def check_batch_fits(samples: int, batch: int, world_size: int) -> None:
    """One step's batches must fit in the training set (drop_last would leave an epoch
    with no batch at all)."""
    if samples < batch * world_size:
        raise DataError(
            f"train.per_device_batch={batch} x world_size {world_size} = {batch * world_size} "
            f"is larger than the training set ({samples} samples)"
        )


def train_loader(
    ds,
    *,
    batch: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    skip_batches: int,
    workers: int,
    task: str,
    pin_memory: bool = False,
) -> DataLoader:
    """One epoch of this rank's shard from ``skip_batches`` in.  A new loader per epoch
    (not persistent workers): the epoch's augmentation seed (``ds.set_epoch``) and the
    resume position must reach the worker processes, which keep their own dataset copy."""
    check_batch_fits(len(ds), batch, world_size)
    ds.set_epoch(epoch)
    # Detection batches hold one orientation (trainer/data/grouping.py); with one group
    # (square images) the batches are DistributedSampler's, in the same order.
    groups = aspect_groups(ds.sizes()) if hasattr(ds, "sizes") else [0] * len(ds)
    batches = GroupedBatches(
        groups, batch, world_size=world_size, rank=rank, seed=seed, epoch=epoch,
        skip_batches=skip_batches,
    )  # fmt: skip
    return DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,  # page-locked batches: non_blocking host-to-GPU copies
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        collate_fn=collate_detection if task == "detection" else None,
        generator=torch.Generator().manual_seed(seed + epoch),
    )


def eval_loader(
    ds, *, batch: int, world_size: int, rank: int, workers: int, task: str, pin_memory=False
):
    sampler = DistributedSampler(ds, world_size, rank, shuffle=False, drop_last=False)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_detection if task == "detection" else None,
    )


def describe(ds, cfg) -> dict:
    """What inference needs from the training data, saved in every checkpoint: the task,
    the input size (a detector: its sizing), and label -> the dataset's category id and
    name (detection: label i + 1 is ``categories[i]``, 0 being background;
    classification: class i)."""
    info = {"task": cfg.model.task, "image_size": cfg.data.image_size}
    if cfg.model.task == "detection":
        info["sizing"] = cfg.data.sizing().describe()  # the detector's resize rule
    return {**info, "categories": ds.categories}

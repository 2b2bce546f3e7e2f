"""Aspect-ratio grouped batches: one orientation per batch, the same count on every rank,
deterministic per (seed, epoch), exact mid-epoch resume, and DistributedSampler's batches
when every image has one orientation."""

import random

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from trainer.data.grouping import GroupedBatches, aspect_groups


def _groups(n, seed=0):
    rng = random.Random(seed)
    sizes = [rng.choice([(640, 480), (480, 640), (500, 500), (427, 640)]) for _ in range(n)]
    return aspect_groups(sizes)


@pytest.mark.parametrize("n,batch,world", [(103, 2, 1), (103, 4, 2), (50, 3, 4), (9, 2, 4)])
def test_batches_are_one_orientation_equal_in_count_and_disjoint(n, batch, world):
    groups = _groups(n)
    per_rank = [
        GroupedBatches(groups, batch, world_size=world, rank=r, seed=7, epoch=3).batches()
        for r in range(world)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {(n // world) // batch}  # DDP needs the same number everywhere
    flat = [i for b in per_rank for batch_ in b for i in batch_]
    assert len(flat) == len(set(flat))  # no image twice in an epoch
    for batches in per_rank:
        assert all(len(b) == batch for b in batches)
        mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
        assert len(mixed) <= 1  # only the fill at the end can mix orientations


def test_deterministic_per_seed_and_epoch_and_resume_is_exact():
    groups = _groups(200)

    def batches(seed, epoch, skip=0):
        return list(
            GroupedBatches(
                groups, 4, world_size=2, rank=1, seed=seed, epoch=epoch, skip_batches=skip
            )
        )

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2) and batches(0, 1) != batches(1, 1)
    full = batches(0, 1)
    assert batches(0, 1, skip=5) == full[5:]
    assert (
        len(GroupedBatches(groups, 4, world_size=2, rank=1, seed=0, epoch=1, skip_batches=5))
        == len(full) - 5
    )


@pytest.mark.parametrize("n,world", [(100, 1), (101, 2), (37, 3)])
def test_one_orientation_gives_distributed_sampler_batches(n, world):
    """Square data (the shapes presets) batches exactly as before grouping existed."""
    for rank in range(world):
        base = DistributedSampler(range(n), world, rank, shuffle=True, seed=5, drop_last=True)
        base.set_epoch(2)
        want = list(BatchSampler(base, 3, drop_last=True))
        got = GroupedBatches([0] * n, 3, world_size=world, rank=rank, seed=5, epoch=2).batches()
        assert got == want


def test_the_train_loader_groups_a_coco_set_by_orientation(tmp_path):
    from tests.trainer.test_sizing import _mixed_coco
    from trainer.data import train_loader
    from trainer.data.coco import CocoDetection

    _mixed_coco(tmp_path, n_train=12, n_val=4)
    ds = CocoDetection(
        tmp_path / "train", tmp_path / "annotations/instances_train.json", train=True
    )
    loader = train_loader(
        ds, batch=2, world_size=1, rank=0, seed=0, epoch=0, skip_batches=0, workers=0,
        task="detection",
    )  # fmt: skip
    for images, _ in loader:
        orient = {bool(im.shape[-1] >= im.shape[-2]) for im in images}
        assert len(orient) == 1, [tuple(im.shape) for im in images]
    assert torch.is_tensor(images[0])

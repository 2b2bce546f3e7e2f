"""Aspect-ratio grouped batches (torchvision references' ``GroupedBatchSampler``,
detectron2's ``AspectRatioGroupedDataset``): a batch holds landscape images or portrait
images, not both, so its padded canvas wastes little and takes one of few shapes.

Distributed and deterministic: every rank draws the same permutation for (seed, epoch),
takes its shard as ``DistributedSampler`` does (every ``world_size``-th index, the tail
dropped so all shards are equal), then walks its shard keeping one buffer per group and
emitting a batch whenever a buffer is full.  Every rank yields exactly ``len(shard) //
batch`` batches (DDP's collectives need the same count): the leftovers of the buffers
fill the last batches, mixed if they must be.  A resumed epoch skips the first batches of
the same list, so the position is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["GroupedBatches", "aspect_groups"]


def aspect_groups(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """0 for a landscape or square image (width >= height), 1 for a portrait one."""
    return [int(h > w) for w, h in sizes]


class GroupedBatches(Sampler[list[int]]):
    """This rank's batches of one epoch, each from one group where it can be."""

    def __init__(
        self,
        groups: Sequence[int],
        batch: int,
        *,
        world_size: int,
        rank: int,
        seed: int,
        epoch: int,
        skip_batches: int = 0,
    ):
        self.groups, self.batch, self.skip = list(groups), batch, skip_batches
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, epoch

    def _shard(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        per_rank = len(order) // self.world_size
        return order[: per_rank * self.world_size][self.rank :: self.world_size]

    def batches(self) -> list[list[int]]:
        shard = self._shard()
        count = len(shard) // self.batch
        out: list[list[int]] = []
        buffers: dict[int, list[int]] = {}
        for idx in shard:
            buf = buffers.setdefault(self.groups[idx], [])
            buf.append(idx)
            if len(buf) == self.batch:
                out.append(buf[:])
                buf.clear()
                if len(out) == count:
                    return out
        rest = [i for buf in buffers.values() for i in buf]
        while len(out) < count:
            out.append(rest[: self.batch])
            rest = rest[self.batch :]
        return out

    def __iter__(self):
        return iter(self.batches()[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self._shard()) // self.batch - self.skip)

"""ImageFolder classification data (``<root>/<class>/*.png``) returning sample indices,
so distributed evaluation can drop DistributedSampler's padded repeats."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as TF

from trainer.data.errors import DataError
from trainer.data.images import load_rgb

__all__ = ["IndexedImageFolder", "MEAN", "STD"]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as torchvision's
_MEAN, _STD = MEAN, STD


class IndexedImageFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, *, train: bool, seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as e:  # ImageFolder's "no class folders / no images"
            raise DataError(f"image folder {root}: {e}") from None
        self.root, self.train, self.seed, self.epoch = root, train, seed, 0

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    @property
    def categories(self) -> list[dict]:
        """Class index i -> its folder name (ImageFolder's sorted order)."""
        return [{"id": i, "name": name} for i, name in enumerate(self.folder.classes)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, idx: int):
        path, label = self.folder.samples[idx]
        x = TF.to_dtype(TF.to_image(load_rgb(Path(path))), torch.float32, scale=True)
        if self.train:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, idx)) & 0x7FFFFFFF)
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
        return TF.normalize(x, _MEAN, _STD), label, idx

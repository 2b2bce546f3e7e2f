"""COCO-format detection data: ``images`` + ``annotations`` (xywh boxes) + ``categories``.

Category ids are mapped to contiguous labels 1..K (0 is background for torchvision's
detectors).  The annotation file and the image files' existence are checked when the
dataset is built, so a bad path fails at start-up on every rank, naming the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from trainer.data.errors import DataError

__all__ = ["CocoDetection", "collate_detection"]


class CocoDetection(torch.utils.data.Dataset):
    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool,
        seed: int = 0,
        bad_boxes: str = "drop",
    ):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.ann_file.is_file():
            raise DataError(f"annotation file {self.ann_file} does not exist")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
            images = data["images"]
            anns = data["annotations"]
            categories = sorted(data["categories"], key=lambda c: c["id"])
            cats = [c["id"] for c in categories]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"annotation file {self.ann_file} is not valid JSON: {e}") from None
        except (KeyError, TypeError) as e:
            raise DataError(
                f"annotation file {self.ann_file} is not COCO format (missing {e})"
            ) from None
        if not images:
            raise DataError(f"annotation file {self.ann_file} lists no images")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        # label i + 1 -> the dataset's own id and name (predictions map back through it)
        self.categories = [{"id": c["id"], "name": str(c.get("name", c["id"]))} for c in categories]
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.images = sorted(images, key=lambda im: im["id"])
        sizes = self._check_images()
        self.boxes = self._boxes(anns, sizes, bad_boxes)
        self.train, self.seed, self.epoch = train, seed, 0

    def _check_images(self) -> dict[int, tuple[int, int]]:
        """Every listed image exists and its header reads (a corrupt file fails here, at
        start-up, not when a batch reaches it); returns image id -> (width, height)."""
        names = [im["file_name"] for im in self.images]
        missing = [n for n in names if not (self.image_dir / n).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {self.ann_file} are missing from "
                f"{self.image_dir}, e.g. {missing[0]}"
            )
        sizes = {}
        for im in self.images:
            path = self.image_dir / im["file_name"]
            try:
                with Image.open(path) as f:
                    sizes[im["id"]] = f.size
                    f.verify()  # chunk structure and checksums, without decoding
            except (OSError, UnidentifiedImageError, SyntaxError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
        return sizes

    def _boxes(self, anns: list, sizes: dict, bad_boxes: str) -> dict[int, list]:
        """Image id -> [(x0, y0, x1, y1, label)].  An unknown category is an error naming
        the annotation; a box with width or height <= 1 px or reaching outside its image
        (by more than 1 px) is dropped with one warning, or an error with
        data.bad_boxes=error."""
        boxes: dict[int, list] = {im["id"]: [] for im in self.images}
        bad = []
        for a in anns:
            if a.get("iscrowd", 0) or a["image_id"] not in boxes:
                continue
            if a["category_id"] not in self.cat_to_label:
                raise DataError(
                    f"annotation {a.get('id')} in {self.ann_file} has category_id "
                    f"{a['category_id']}; the file's categories are {sorted(self.cat_to_label)}"
                )
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            if w <= 1 or h <= 1 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                bad.append(f"annotation {a.get('id')} bbox {a['bbox']} in a {width}x{height} image")
                continue
            boxes[a["image_id"]].append((x, y, x + w, y + h, self.cat_to_label[a["category_id"]]))
        if bad and bad_boxes == "error":
            raise DataError(
                f"{len(bad)} box(es) in {self.ann_file} are empty or outside their image, "
                f"e.g. {bad[0]} (data.bad_boxes=drop skips them with a warning)"
            )
        if bad:
            warnings.warn(
                f"dropped {len(bad)} box(es) of {self.ann_file} that are empty or outside their "
                f"image, e.g. {bad[0]} (data.bad_boxes=error makes this an error)",
                stacklevel=3,
            )
        return boxes

    @property
    def num_classes(self) -> int:
        return len(self.cat_to_label)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        info = self.images[idx]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                image = TF.to_image(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        image = TF.to_dtype(image, torch.float32, scale=True)
        rows = self.boxes[info["id"]]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([r[4] for r in rows], dtype=torch.int64)
        if self.train:
            # Augmentation drawn from (seed, epoch, index), not from a global RNG, so a run
            # resumed mid-epoch sees exactly the samples an uninterrupted run would.
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, idx)) & 0x7FFFFFFF)
            if torch.rand((), generator=g) < 0.5:
                width = image.shape[-1]
                image = image.flip(-1)
                boxes = torch.stack(
                    [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1
                )
        return image, {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}


def collate_detection(batch):
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)

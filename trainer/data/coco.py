"""COCO-format detection data: ``images`` + ``annotations`` (xywh boxes) + ``categories``.

Category ids are mapped to contiguous labels 1..K (0 is background for torchvision's
detectors).  The annotation file and the image files' existence are checked when the
dataset is built, so a bad path fails at start-up on every rank, naming the file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.data.errors import DataError
from trainer.data.images import DEFAULT_MAX_PIXELS, CheckCache, check_image, load_rgb

__all__ = ["CocoDetection", "collate_detection", "read_annotations"]

# One parsed annotation file handed from the run plan (which reads the image sizes) to
# the dataset built next, so a start parses COCO's 450 MB file once, not twice.
_HANDED: dict = {}


def read_annotations(path: str | Path, *, hand_over: bool = False):
    """The parsed JSON at ``path``.  ``hand_over``: keep it for the next call on the same
    unchanged file (size and mtime), which takes it; later calls parse again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    data = _HANDED.pop(key, None)
    if data is None:
        with open(path) as f:
            data = json.load(f)
    if hand_over:
        _HANDED.clear()
        _HANDED[key] = data
    return data


class CocoDetection(torch.utils.data.Dataset):
    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool,
        seed: int = 0,
        bad_boxes: str = "drop",
        check_images: str = "header",
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        color_jitter: float = 0.0,
    ):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.ann_file.is_file():
            raise DataError(f"annotation file {self.ann_file} does not exist")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist")
        images, anns, categories = self._read()
        cats = [c["id"] for c in categories]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        # label i + 1 -> the dataset's own id and name (predictions map back through it)
        self.categories = [{"id": c["id"], "name": str(c.get("name", c["id"]))} for c in categories]
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.images = sorted(images, key=lambda im: im["id"])
        sizes = self._check_images(check_images == "full", max_image_pixels)
        self.boxes = self._boxes(anns, sizes, bad_boxes)
        # The ground truth pycocotools scores against: the file's own annotations, with
        # the fields it needs and COCO writers may leave out (area, iscrowd) filled in.
        self.coco_gt = {
            "images": [
                {"id": im["id"], "width": w, "height": h}
                for im, (w, h) in ((im, sizes[im["id"]]) for im in self.images)
            ],
            "annotations": [
                {
                    **a,
                    "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                    "iscrowd": a.get("iscrowd", 0),
                }
                for a in anns
                if a["image_id"] in sizes
            ],
            "categories": categories,
        }
        self.train, self.seed, self.epoch = train, seed, 0
        jitter = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.transforms = v2.Compose([v2.RandomHorizontalFlip(0.5), *jitter])

    def _read(self) -> tuple[list, list, list]:
        """The file's images, annotations and categories, every entry checked for the
        keys and types the rest relies on; DataError naming the entry otherwise."""
        where = self.ann_file
        try:
            data = read_annotations(where)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"annotation file {where} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise DataError(
                f"annotation file {where} is not COCO format: its top level is a "
                f"{type(data).__name__}, not an object with images, annotations, categories"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                got = "missing" if key not in data else f"a {type(data[key]).__name__}"
                raise DataError(
                    f"annotation file {where} is not COCO format: '{key}' is {got}, expected a list"
                )
        images, anns, categories = data["images"], data["annotations"], data["categories"]
        if not images:
            raise DataError(f"annotation file {where} lists no images")
        _check_entries(where, "image", images, {"id": _ID, "file_name": str})
        _check_entries(where, "category", categories, {"id": _ID})
        _unique(where, "image", [im["id"] for im in images])
        _unique(where, "category", [c["id"] for c in categories])
        _check_entries(
            where, "annotation", anns, {"image_id": _ID, "category_id": _ID, "bbox": list}
        )
        for a in anns:
            bbox = a["bbox"]
            if len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise DataError(
                    f"annotation {_name(a)} in {where} has bbox {bbox}: expected 4 numbers "
                    f"[x, y, width, height]"
                )
            if not all(math.isfinite(v) for v in bbox):
                raise DataError(
                    f"annotation {_name(a)} in {where} has a bbox that is not finite: {bbox}"
                )
        known = {im["id"] for im in images}
        orphans = [a for a in anns if a["image_id"] not in known]
        if orphans:
            warnings.warn(
                f"{where}: {len(orphans)} annotation(s) point at image ids the file does not "
                f"list (e.g. annotation {_name(orphans[0])}, image_id "
                f"{orphans[0]['image_id']!r}); they are ignored",
                stacklevel=4,
            )
        if not anns:
            warnings.warn(f"{where} has no annotations: every image is background", stacklevel=4)
        return images, anns, sorted(categories, key=lambda c: c["id"])

    def _check_images(self, full: bool, max_pixels: int) -> dict[int, tuple[int, int]]:
        """Every listed image exists, reads and is whole (a corrupt or truncated file fails
        here, at start-up, not when a batch reaches it); returns id -> (width, height)."""
        stats, missing = {}, []
        for im in self.images:
            try:
                stats[im["file_name"]] = os.stat(self.image_dir / im["file_name"])
            except OSError:
                missing.append(im["file_name"])
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {self.ann_file} are missing from "
                f"{self.image_dir}, e.g. {missing[0]}"
            )
        # Files unchanged since a previous start's check are not opened again.
        key = f"{self.ann_file.resolve()}|{self.image_dir.resolve()}|{full}|{max_pixels}"
        cache, sizes = CheckCache(key), {}
        for im in self.images:
            name, stat = im["file_name"], stats[im["file_name"]]
            size = cache.get(name, stat)
            if size is None:
                size = check_image(self.image_dir / name, max_pixels=max_pixels, full=full)
                cache.put(name, stat, size)
            sizes[im["id"]] = size
        cache.save()
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
                    f"annotation {_name(a)} in {self.ann_file} has category_id "
                    f"{a['category_id']!r}; the file's categories are {sorted(self.cat_to_label)}"
                )
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            if w <= 1 or h <= 1 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                bad.append(f"annotation {_name(a)} bbox {a['bbox']} in a {width}x{height} image")
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

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image, in index order (read at start-up)."""
        return [(im["width"], im["height"]) for im in self.coco_gt["images"]]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        info = self.images[idx]
        path = self.image_dir / info["file_name"]
        image = TF.to_dtype(TF.to_image(load_rgb(path)), torch.float32, scale=True)
        rows = self.boxes[info["id"]]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([r[4] for r in rows], dtype=torch.int64)
        if self.train:
            image, boxes = self._augment(image, boxes, idx)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}

    def _augment(self, image: torch.Tensor, boxes: torch.Tensor, idx: int):
        """torchvision.transforms.v2 on the image and its boxes: a horizontal flip, and
        colour jitter when ``color_jitter`` > 0.  Drawn from (seed, epoch, index), not
        from the global RNG, so a run resumed mid-epoch sees exactly the samples an
        uninterrupted run would (the flip is the first draw, as it always was)."""
        canvas = tuple(image.shape[-2:])
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, idx)) & 0x7FFFFFFF)
            image, boxes = self.transforms(tv_tensors.Image(image), boxes)
        return image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)


def collate_detection(batch):
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# A COCO id: an integer (a bool is not one).  A string "1" is refused by name: it would
# otherwise match no category or image and be reported as missing.
_ID = "id"


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _name(entry: dict) -> str:
    return repr(entry["id"]) if "id" in entry else "(no id)"


def _check_entries(where: Path, what: str, entries: list, keys: dict) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(
                f"{what} entry {i} in {where} is a {type(entry).__name__}, not an object"
            )
        for key, kind in keys.items():
            label = f"{what} {_name(entry)} (entry {i})"
            if key not in entry:
                raise DataError(f"{label} in {where} has no '{key}'")
            value = entry[key]
            if kind == _ID:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise DataError(
                        f"{label} in {where} has {key} {value!r} (a {type(value).__name__}); "
                        f"COCO ids are integers"
                    )
            elif not isinstance(value, kind):
                raise DataError(
                    f"{label} in {where} has {key} {value!r}: expected a {kind.__name__}"
                )


def _unique(where: Path, what: str, ids: list) -> None:
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(
            f"{where} lists {what} id {dup[0]!r} more than once ({len(dup)} duplicate "
            f"{what} id(s)): each {what} needs its own id"
        )

"""The embedded "shapes" dataset: generated deterministically on first use, cached on disk.

Written in the same formats users bring, so the very same loaders read a real dataset:

* detection: ``<root>/det/{train,val}/*.png`` + ``<root>/det/annotations/instances_{split}.json``
  (COCO: images, annotations with xywh boxes, categories);
* classification: ``<root>/cls/{train,val}/<class>/*.png`` (torchvision ImageFolder).

Images hold 1-4 circles, squares and triangles of random size and colour on a random
two-colour gradient with noise.  Generation writes into a temporary folder and renames it
into place (``trainer.data.generated``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.generated import ensure_generated, write_split

__all__ = ["CLASSES", "ensure_shapes", "shapes_dir"]

CLASSES = ("circle", "square", "triangle")
_VERSION = 1  # bump when the generator changes, so caches regenerate


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    grad = a * (1 - t) + b * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    img = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, cls: int, box, colour) -> None:
    x0, y0, x1, y1 = box
    if CLASSES[cls] == "circle":
        draw.ellipse(box, fill=colour)
    elif CLASSES[cls] == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _contrasting_colour(rng: np.random.Generator, bg: np.ndarray) -> tuple[int, int, int]:
    # Reject colours too close to the local background so every shape is visible.
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - bg).sum() > 150:
            break
    return tuple(int(v) for v in c)


def _det_image(rng: np.random.Generator, size: int):
    img = _background(rng, size)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            side = int(rng.integers(size // 8, size // 2.5))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
            box = (x0, y0, x0 + side, y0 + side)
            # keep objects apart: overlapping shapes make ambiguous ground truth
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        bg = img[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2].astype(int)
        _draw(draw, cls, (box[0], box[1], box[2] - 1, box[3] - 1), _contrasting_colour(rng, bg))
        boxes.append(box)
        objects.append((cls, box))
    return canvas, objects


def _write_detection(out: Path, split: str, n: int, size: int, seed: int) -> None:
    stream = (seed, 0 if split == "train" else 1)
    write_split(out, split, n, lambda rng: _det_image(rng, size), stream, "png", CLASSES)


def _write_classification(out: Path, split: str, n: int, size: int, seed: int) -> None:
    for name in CLASSES:
        (out / split / name).mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng([seed, 2 if split == "train" else 3, i])
        img = _background(rng, size)
        canvas = Image.fromarray(img)
        cls = i % len(CLASSES)
        side = int(rng.integers(size // 4, int(size * 0.7)))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        bg = img[y0 + side // 2, x0 + side // 2].astype(int)
        _draw(
            ImageDraw.Draw(canvas),
            cls,
            (x0, y0, x0 + side - 1, y0 + side - 1),
            _contrasting_colour(rng, bg),
        )
        canvas.save(out / split / CLASSES[cls] / f"{i:06d}.png")


def shapes_dir(
    root: str | Path, task: str, num_train: int, num_val: int, size: int, seed: int = 0
) -> Path:
    """Where ``ensure_shapes`` puts (or finds) the data for these parameters."""
    kind = "det" if task == "detection" else "cls"
    return Path(root) / f"{kind}_{size}px_{num_train}_{num_val}_s{seed}_v{_VERSION}"


def ensure_shapes(
    root: str | Path, task: str, num_train: int, num_val: int, size: int, seed: int = 0
) -> Path:
    """Generate (once) and return the dataset folder for ``task``.

    The folder is keyed by its parameters, so changing the size or count generates a new
    one instead of silently reusing the old.
    """
    write = _write_detection if task == "detection" else _write_classification

    def both(tmp: Path) -> None:
        write(tmp, "train", num_train, size, seed)
        write(tmp, "val", num_val, size, seed)

    return ensure_generated(shapes_dir(root, task, num_train, num_val, size, seed), both)

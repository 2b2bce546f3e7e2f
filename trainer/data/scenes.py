"""The embedded "scenes" detection dataset: photo-like JPEGs, generated on first use.

Closer to what detectors are trained on than the shapes set, while still made in seconds
and small enough for CPU training:

* mixed sizes and both orientations: the long side is drawn from [image_size / 2,
  image_size], the aspect from 4:3, 3:2, 16:9 and 1:1, portrait about a third of the time;
* textured clutter: a noisy two-colour gradient with low-frequency texture, lines and
  irregular polygons that belong to no class;
* 6 classes of regular shapes (circle, square, triangle, star, ring, cross), 2-9 per image,
  small and large (log-uniform, 6-55 % of the short side), overlapping, with shading;
* occlusion: later objects may cover earlier ones.  The boxes are the visible extent (as
  COCO's are), and an object with under 35 % of itself visible is not labelled;
* JPEG at quality 90, so decoding and artefacts are those of photos.

Layout: ``<root>/scenes_<size>px_<train>_<val>_s<seed>_v<version>/{train,val}/*.jpg`` and
``annotations/instances_{split}.json`` (COCO), read by the same loader as a user's set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.data.generated import ensure_generated, write_split

__all__ = ["CLASSES", "ensure_scenes", "nominal_aspects", "scenes_dir"]

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross")
_VERSION = 1  # bump when the generator changes, so caches regenerate
# long / short side, and how often each is drawn; a third of the non-square ones portrait
_ASPECTS = ((4 / 3, 0.4), (3 / 2, 0.2), (16 / 9, 0.2), (1.0, 0.2))
_MIN_VISIBLE = 0.35  # an object less visible than this is not labelled


def nominal_aspects() -> tuple[float, ...]:
    """The long/short ratios the generator draws (each image's own is within rounding)."""
    return tuple(sorted(a for a, _ in _ASPECTS))


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height): the long side in [size / 2, size], an aspect from _ASPECTS."""
    long = int(rng.integers(size // 2, size + 1))
    aspect = _ASPECTS[rng.choice(len(_ASPECTS), p=[p for _, p in _ASPECTS])][0]
    short = max(16, round(long / aspect))
    return (short, long) if rng.random() < 1 / 3 else (long, short)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A noisy gradient with low-frequency texture, lines and irregular polygons (clutter
    that is no class), slightly blurred."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h)
    grad = a * (1 - t[:, None]) + b * t[:, None]
    grad = grad[None, :, :] if len(t) == w else grad[:, None, :]
    coarse = rng.normal(0, 30, (max(2, h // 24), max(2, w // 24), 3))
    texture = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (w, h), Image.BICUBIC
        ),
        dtype=np.float64,
    )
    img = np.broadcast_to(grad, (h, w, 3)) + (texture - 128) + rng.normal(0, 8, (h, w, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 12))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = rng.integers(0, w), rng.integers(0, h)
        if rng.random() < 1 / 3:  # a line
            x1, y1 = rng.integers(0, w), rng.integers(0, h)
            draw.line([(x, y), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:  # an irregular polygon: a blob no class looks like
            r = rng.uniform(0.03, 0.15) * min(w, h)
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = r * rng.uniform(0.4, 1.0, n)
            pts = [
                (x + ri * math.cos(t), y + ri * math.sin(t))
                for ri, t in zip(radii, angles, strict=True)
            ]
            draw.polygon(pts, fill=colour)
    return canvas.filter(ImageFilter.GaussianBlur(0.6))


def _shape_mask(cls: str, w: int, h: int, cx: float, cy: float, r: float) -> np.ndarray:
    """The pixels of one shape centred at (cx, cy) with radius r, as a bool (h, w) mask
    (a ring's hole is not part of it, so whatever is behind shows through)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls in ("circle", "ring"):
        draw.ellipse(box, fill=255)
        if cls == "ring":
            inner = 0.55 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif cls == "square":
        draw.rectangle(box, fill=255)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif cls == "star":
        pts = [
            (cx + rad * math.cos(ang), cy + rad * math.sin(ang))
            for k in range(10)
            for rad, ang in [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5)]
        ]
        draw.polygon(pts, fill=255)
    else:  # cross: two bars
        t = 0.32 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    return np.asarray(mask) > 0


def _shaded_fill(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A colour with a linear shading across the image in a random direction (an object
    lit from one side), (h, w, 3) floats."""
    colour = rng.integers(0, 256, 3).astype(np.float64)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (
        np.cos(ang) * np.linspace(-1, 1, w)[None, :] + np.sin(ang) * np.linspace(-1, 1, h)[:, None]
    )
    return colour * (1 + rng.uniform(0.05, 0.3) * ramp[..., None])


def _scene(rng: np.random.Generator, size: int):
    """One image and its labelled objects ``(class, (x0, y0, x1, y1))``, boxes being the
    visible extent: objects are composited in order, so later ones occlude earlier."""
    w, h = _image_size(rng, size)
    img = np.asarray(_background(rng, w, h), dtype=np.float64).copy()
    ids = np.zeros((h, w), dtype=np.int32)
    placed = []  # (class index, full pixel area)
    short = min(w, h)
    for ident in range(1, int(rng.integers(2, 10)) + 1):
        r = 0.5 * short * math.exp(rng.uniform(math.log(0.06), math.log(0.55)))
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        cls = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(CLASSES[cls], w, h, cx, cy, r)
        img[mask] = _shaded_fill(rng, w, h)[mask]
        ids[mask] = ident
        placed.append((cls, int(mask.sum())))
    objects = []
    for ident, (cls, full) in enumerate(placed, start=1):
        ys, xs = np.nonzero(ids == ident)
        if len(xs) < max(9, _MIN_VISIBLE * full):
            continue
        objects.append((cls, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return Image.fromarray(_shade(rng, img)), objects


def _shade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A light left-right illumination change and sensor noise over the whole image."""
    h, w, _ = img.shape
    light = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, w)[None, :, None]
    out = img * light + rng.normal(0, 6, img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _write_split(out: Path, split: str, n: int, size: int, seed: int) -> None:
    stream = (seed, 10 if split == "train" else 11)
    make = lambda rng: _scene(rng, size)  # noqa: E731
    write_split(out, split, n, make, stream, "jpg", CLASSES, quality=90)


def scenes_dir(root: str | Path, num_train: int, num_val: int, size: int, seed: int = 0) -> Path:
    """Where ``ensure_scenes`` puts (or finds) the data for these parameters."""
    return Path(root) / f"scenes_{size}px_{num_train}_{num_val}_s{seed}_v{_VERSION}"


def ensure_scenes(root: str | Path, num_train: int, num_val: int, size: int, seed: int = 0) -> Path:
    """Generate (once) and return the dataset folder; keyed by its parameters."""

    def both(tmp: Path) -> None:
        _write_split(tmp, "train", num_train, size, seed)
        _write_split(tmp, "val", num_val, size, seed)

    return ensure_generated(scenes_dir(root, num_train, num_val, size, seed), both)

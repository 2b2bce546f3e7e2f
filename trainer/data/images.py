"""Reading image files: one start-up check and one decoder for training, eval and predict.

* ``check_image``: the header reads, the size is under the pixel limit, the chunk
  structure verifies (PIL's ``verify()``), and the file is whole.  ``verify()`` does not
  see a JPEG or PNG cut short, so the end of the file is checked too: a PNG ends with its
  IEND chunk, a JPEG with the EOI marker (FF D9).  A JPEG with bytes after its EOI (some
  cameras append data) is decoded once to decide.  ``full=True`` decodes every image.
* ``load_rgb``: 8-bit RGB whatever the file's mode.  PIL's ``convert("RGB")`` clips a
  16-bit grayscale image (``I;16``, ``I``) to 255, so it would train on an all-white
  image; those are scaled from 16 to 8 bits first.  Palette, CMYK, LA/RGBA and 1-bit
  images go through PIL's conversion; 32-bit float images are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainer.data.errors import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "CheckCache", "check_image", "load_rgb", "READ_ERRORS"]

# PIL's own bomb limit (it warns above it and refuses at twice it); ours refuses above.
DEFAULT_MAX_PIXELS = 89_478_485
# What PIL raises for files it cannot read (DecompressionBombError is not an OSError).
READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def _open(path: Path) -> Image.Image:
    # The pixel limit is ours (check_image); PIL's would refuse a large but allowed image.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_image(path: Path, *, max_pixels: int, full: bool = False) -> tuple[int, int]:
    """(width, height) of a readable, whole image; DataError naming the file otherwise."""
    try:
        with _open(path) as im:
            size, fmt = im.size, im.format
            if size[0] * size[1] > max_pixels:
                raise DataError(
                    f"image {path} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} "
                    f"Mpixel), above data.max_image_pixels={max_pixels}: downscale it or "
                    f"raise the limit"
                )
            if im.mode == "F":
                raise DataError(f"image {path} is 32-bit float (mode F): save it as 8-bit")
            im.verify()  # chunk structure and checksums, without decoding
        if full or not _ends_whole(path, fmt):
            with _open(path) as im:
                im.load()  # raises "image file is truncated" for a file cut short
    except DataError:
        raise
    except READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return size


def _ends_whole(path: Path, fmt: str | None) -> bool:
    """True when the file ends as its format says a whole file ends (cheap: the last
    bytes only); False means "decode it to be sure"."""
    if fmt not in ("PNG", "JPEG"):
        return True  # no cheap end marker: verify() is the check
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    if fmt == "PNG":
        return tail.endswith(_PNG_END)
    return tail.rstrip(b"\0\r\n ").endswith(_JPEG_END)


def load_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB (see the module docstring); DataError naming the file."""
    try:
        with _open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                a = np.asarray(im).astype(np.int64)
                if a.size and (a.min() < 0 or a.max() > 65535):
                    raise DataError(
                        f"image {path} is 32-bit integer (mode {im.mode}) with values outside "
                        f"0-65535: save it as 8 or 16 bits"
                    )
                # 16 -> 8 bits: 65535 maps to 255, as 255 maps to 1.0 for an 8-bit file
                return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert(
                    "RGB"
                )
            if im.mode == "F":
                raise DataError(f"image {path} is 32-bit float (mode F): save it as 8-bit")
            return im.convert("RGB")
    except DataError:
        raise
    except READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class CheckCache:
    """What ``check_image`` found for each file, kept between starts: a file whose size
    and modification time are unchanged is not opened again.  It lives in the user's
    cache directory ($NORMPILOT_CACHE_DIR, else ~/.cache/normpilot), never in the
    dataset's folder (which may be read-only), one file per (annotation file, image
    folder, check mode, pixel limit).  A cache that cannot be read or written is ignored.
    """

    def __init__(self, key: str):
        root = os.environ.get("NORMPILOT_CACHE_DIR") or Path.home() / ".cache" / "normpilot"
        name = hashlib.sha1(key.encode()).hexdigest()[:20]
        self.path = Path(root) / "image_check" / f"{name}.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.fresh: dict[str, list] = {}

    def get(self, name: str, stat: os.stat_result) -> tuple[int, int] | None:
        e = self.entries.get(name)
        if e is not None and e[:2] == [stat.st_size, stat.st_mtime_ns]:
            self.fresh[name] = e
            return e[2], e[3]
        return None

    def put(self, name: str, stat: os.stat_result, size: tuple[int, int]) -> None:
        self.fresh[name] = [stat.st_size, stat.st_mtime_ns, *size]

    def save(self) -> None:
        """Keep the files seen in this check (an atomic write; a failure is ignored)."""
        if self.fresh == self.entries:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.fresh))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)

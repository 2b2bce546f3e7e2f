"""Start-up cost of the image check (``data.check_images``) at 2k and at COCO train2017's
118,287 images: the time ``CocoDetection`` takes to be built, which is what every rank
spends before the model is built.

    python -m bench.image_check            # writes bench/results/image_check.{json,md}
    python -m bench.image_check --quick    # 200 images, warm page cache only (make test)

The images are JPEGs at COCO's sizes (640 px on the long side, landscape and portrait),
each a distinct file with its own bytes, so a cold page cache reads every one from disk.
``cold`` drops the page cache before the measurement (needs root; skipped otherwise),
``warm`` measures a second pass with every file in the page cache (the header check only:
decoding is CPU-bound), both without the check's own cache; ``second start`` measures a
build after a first one filled the check's cache (trainer.data.images.CheckCache: files
unchanged since are stat-ed, not opened).  One file per cell in
bench/results/image_check_cells/, reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import md_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COCO_TRAIN = 118_287
# (width, height) drawn like COCO's: mostly 640 x 480/427, some portrait
SIZES = [(640, 480), (640, 427), (480, 640), (427, 640), (640, 640), (500, 375)]


def _seed_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct JPEGs: a smooth random field plus noise, ~60-100 KB at quality 90."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        a = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        p = folder / f"seed_{i:05d}.jpg"
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def _dataset(folder: Path, seeds: list[Path], n: int) -> Path:
    """``n`` image files (byte copies of the seeds: distinct files, not links) and a COCO
    annotation file listing them with one box each."""
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        name = f"{i:06d}.jpg"
        if not (folder / name).exists():
            shutil.copyfile(seeds[i % len(seeds)], folder / name)
        w, h = SIZES[(i % len(seeds)) % len(SIZES)]
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 50, 40]})
    ann = folder.parent / f"ann_{n}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1}]}))
    return ann


def _drop_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _time_build(folder: Path, ann: Path, mode: str, cache_dir: Path) -> float:
    """Seconds to build the dataset, with the image-check cache in ``cache_dir`` (an
    empty folder: every image is checked; a filled one: a second start)."""
    from trainer.data.coco import CocoDetection

    os.environ["NORMPILOT_CACHE_DIR"] = str(cache_dir)
    start = time.perf_counter()
    CocoDetection(folder, ann, train=True, check_images=mode)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, help="where the images go (default: a temp folder)")
    a = ap.parse_args()
    counts = [200] if a.quick else [2_000, COCO_TRAIN]
    name = "image_check_quick" if a.quick else "image_check"
    cells = a.out / f"{name}_cells"
    cells.mkdir(parents=True, exist_ok=True)
    # Decoding is CPU-bound: a full check is measured from a cold cache only.  "second
    # start": the check's own cache filled by a first build (page cache warm).
    caches = {"header": ("cold", "warm", "second start"), "full": ("cold",)}
    if a.quick:
        caches = {"header": ("warm", "second start"), "full": ("warm",)}
    todo = [(n, mode, cache) for n in counts for mode in caches for cache in caches[mode]]
    results = []
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        seeds = None
        for n, mode, cache in todo:
            f = cells / f"n{n}_{mode}_{cache.replace(' ', '_')}.json"
            if not f.exists():
                seeds = seeds or _seed_images(work / "seeds", min(2_000, n))
                ann = work / f"ann_{n}.json"
                if not ann.exists():
                    ann = _dataset(work / "images", seeds, n)
                if cache == "cold" and not _drop_cache():
                    print(f"skipping {f.name}: dropping the page cache needs root")
                    continue
                fresh = Path(tempfile.mkdtemp(dir=work))  # no check cache
                if cache in ("warm", "second start"):
                    _time_build(work / "images", ann, mode, fresh)  # fill the caches
                if cache != "second start":
                    fresh = Path(tempfile.mkdtemp(dir=work))
                seconds = _time_build(work / "images", ann, mode, fresh)
                row = {"images": n, "check_images": mode, "cache": cache, "seconds": seconds}
                row["ms_per_image"] = 1000 * seconds / n
                f.write_text(json.dumps(row) + "\n")
                print(row, flush=True)
            results.append(json.loads(f.read_text()))
    table = md_table(
        ["images", "data.check_images", "cache", "start-up s", "ms / image"],
        "rllrr",
        ([f"{r['images']:,}", r["check_images"], r["cache"], f"{r['seconds']:.1f}",
          f"{r['ms_per_image']:.2f}"] for r in results),
    )  # fmt: skip
    caption = (
        f"Building the COCO dataset (annotation file read and checked, every image checked), "
        f"one process, JPEGs at COCO's sizes, {os.cpu_count()} CPUs (bench/image_check.py)"
    )
    write_results(a.out, name, results, caption, table)


if __name__ == "__main__":
    main()

"""A preset trained from scratch as a user runs it, timed, once per seed: the README's
headline run (``make train``: configs/shapes_det.yaml) and the scenes preset's.

    python -m bench.default_run      # seeds 0 and 1 -> bench/results/default_run.{json,md}
    python -m bench.default_run --preset scenes      # -> bench/results/scenes_run.{json,md}
    python -m bench.default_run --seeds 0 --out /tmp/x --set train.max_steps=4   (a smoke run)

Each seed is a real ``python -m trainer train`` in a fresh folder (the data is generated
once, under data/shapes, as ``make train`` does); the final eval row of its metrics.jsonl
and the wall time of the whole command are kept, one file per seed, reused when present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# preset -> (config, results name, how the README names the command)
PRESETS = {
    "shapes": ("configs/shapes_det.yaml", "default_run", "`make train`"),
    "scenes": ("configs/scenes_det.yaml", "scenes_run", "`python -m trainer train`"),
}


def _run(config: str, seed: int, extra: list[str], out: Path) -> dict:
    args = ["-m", "trainer", "train", "--config", config, f"run.output_dir={out}"]
    args += [f"run.name=seed{seed}", f"run.seed={seed}", "wandb.mode=disabled", *extra]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval" in r][-1]
    return {
        "seed": seed,
        "step": final["step"],
        "mAP50": final["eval"]["mAP50"],
        "mAP": final["eval"]["mAP"],
        "seconds": seconds,
        "overrides": extra,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="shapes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides (smoke runs)")
    a = ap.parse_args()
    config, name, command = PRESETS[a.preset]
    cells = a.out / f"{name}_cells"
    cells.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            f = cells / f"seed{seed}.json"
            if not f.exists():
                f.write_text(json.dumps(_run(config, seed, a.set, Path(tmp)), indent=2) + "\n")
            rows.append(json.loads(f.read_text()))
    table = md_table(
        ["seed", "steps", "COCO mAP@.5", "mAP@[.5:.95]", "wall time (train + evals)"],
        "rrrrr",
        ([r["seed"], f"{r['step']:,}", f"{r['mAP50']:.3f}", f"{r['mAP']:.3f}",
          "{} min {} s".format(*divmod(round(r["seconds"]), 60))] for r in rows),
    )  # fmt: skip
    caption = (
        f"{command} ({config}) from scratch, {rows[0]['date']}, {rows[0]['machine']} "
        f"(bench/default_run.py; {os.cpu_count()} CPUs):"
    )
    write_results(a.out, name, rows, caption, table)


if __name__ == "__main__":
    main()

"""bench/loader.py --quick: per-worker loading rate of the trainer's dataset against the
training step's demand, both measured."""

import json

from tests.helpers import run_bench


def test_quick_loader_bench_measures_both_decoders_and_the_demand(tmp_path):
    proc = run_bench("loader.py", "--quick", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "loader_quick.json").read_text())
    assert row["images"] == 8
    for key in ("pil_per_worker", "torchvision_per_worker", "step_demand"):
        assert row[key] > 0, key
    assert row["workers_needed"] == row["step_demand"] / row["pil_per_worker"]
    assert "| PIL (the trainer's) |" in (tmp_path / "loader_quick.md").read_text()

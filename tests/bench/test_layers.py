"""bench/layers.py: the 4-process sync-group rows (group of 2 vs all 4 vs local BN)."""

import json
import shutil

from tests.helpers import ROOT, run_bench


def test_groups_only_adds_the_four_process_rows(tmp_path):
    shutil.copy(ROOT / "bench" / "results" / "layers.json", tmp_path / "layers.json")
    proc = run_bench("layers.py", "--groups-only", "--repeats", "2", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "layers.json").read_text())["rows"]
    four = [r for r in rows if r["baseline"] == "bn (same 4 processes)"]
    assert {r["layer"] for r in four} == {"syncbn_world4", "syncbn_groups2of4"}
    assert len(four) == 6 and all(r["ratio"] > 0 for r in four)
    assert any(r["layer"] == "brn" for r in rows)  # the other rows are kept
    assert "syncbn_groups2of4" in (tmp_path / "layers.md").read_text()


def test_sync_cost_model_uses_the_policy_s_groups(tmp_path):
    proc = run_bench("sync_cost_model.py", "--out", tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "sync_cost_model.md").read_text().splitlines()
    rows = [x.split("|")[1:-1] for x in lines if x.startswith("| ") and "GPUs" not in x]
    assert [r[0].strip() for r in rows] == ["8", "64", "256", "1024"]
    # 2 images per GPU against min_batch 8: groups of 4 ranks, whatever the world
    assert {r[4].strip() for r in rows} == {"4"}
    assert rows[2][-1].strip() == "94x"  # 256 GPUs: world sync vs groups of 4

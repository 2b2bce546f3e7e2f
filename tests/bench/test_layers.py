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


def test_sync_cost_model_prints_the_readme_table():
    proc = run_bench("sync_cost_model.py", timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [x for x in lines if x.startswith("| ") and "GPUs" not in x]
    assert [r.split("|")[1].strip() for r in rows] == ["8", "64", "256", "1024"]
    assert rows[2].rstrip(" |").endswith("51x")  # 256 GPUs: world sync vs groups of 8

"""bench/image_check.py --quick builds a real COCO dataset of JPEGs and reports the
start-up check's cost for both modes; a second call reuses its cells."""

import json

from tests.helpers import run_bench


def test_quick_run_reports_both_modes_and_reuses_its_cells(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    proc = run_bench("image_check.py", "--quick", "--out", out, "--work", work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "image_check_quick.json").read_text())
    assert {(r["images"], r["check_images"]) for r in rows} == {(200, "header"), (200, "full")}
    for r in rows:
        assert r["seconds"] > 0 and r["ms_per_image"] == 1000 * r["seconds"] / 200
    table = (out / "image_check_quick.md").read_text()
    assert "| 200 | full | warm |" in table and "| 200 | header | second start |" in table
    by_cache = {r["cache"]: r["seconds"] for r in rows if r["check_images"] == "header"}
    assert set(by_cache) == {"warm", "second start"}
    again = run_bench("image_check.py", "--quick", "--out", out, "--work", work, timeout=300)
    assert again.returncode == 0 and "{'images'" not in again.stdout  # nothing re-measured

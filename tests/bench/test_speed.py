"""bench/speed.py --quick runs end to end and reports every measurement it promises."""

import json
import os

import pytest

from tests.helpers import run_bench


def test_quick_mode_reports_all_measurements(tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "data"
    proc = run_bench("speed.py", "--quick", "--out", out, "--data-root", data, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "speed_quick.json").read_text())
    over = res["trainer_overhead"]
    assert over["trainer_step_s"] > 0 and over["hand_loop_step_s"] > 0
    assert over["ratio"] == over["trainer_step_s"] / over["hand_loop_step_s"]
    # --quick is one repeat, so the per-repeat range is that repeat's ratio.
    assert over["ratio_range"] == [pytest.approx(over["ratio"])] * 2
    pipe = res["data_pipeline"]
    for key in ("loader_images_per_s", "model_images_per_s", "trainer_step_in_memory_s"):
        assert pipe[key] > 0
    # 0 workers, 1, and the preset's auto count, each against the same in-memory step.
    assert set(pipe["by_workers"]) == {"0", "1", str(min(8, os.cpu_count()))}
    for r in pipe["by_workers"].values():
        assert r["over_in_memory"] == r["trainer_step_s"] / pipe["trainer_step_in_memory_s"]
    assert set(res["ddp_cpu"]["rows"]) == {"bn", "syncbn", "syncbrn"}
    assert res["ddp_cpu"]["rows"]["bn"]["vs_ddp_bn"] == 1.0
    table = (out / "speed_quick.md").read_text()
    assert "trainer step / hand-written loop step" in table and "| syncbrn |" in table

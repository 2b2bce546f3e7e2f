"""bench/speed.py --quick runs end to end and reports every measurement it promises."""

import json
import subprocess

from tests.trainer.conftest import PY, ROOT, subprocess_env


def test_quick_mode_reports_all_measurements(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            PY,
            str(ROOT / "bench" / "speed.py"),
            "--quick",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "speed_quick.json").read_text())
    over = res["trainer_overhead"]
    assert over["trainer_step_s"] > 0 and over["hand_loop_step_s"] > 0
    assert over["ratio"] == over["trainer_step_s"] / over["hand_loop_step_s"]
    pipe = res["data_pipeline"]
    for key in ("loader_images_per_s", "model_images_per_s", "real_over_in_memory"):
        assert pipe[key] > 0
    assert set(res["ddp_cpu"]["rows"]) == {"bn", "syncbn", "syncbrn"}
    assert res["ddp_cpu"]["rows"]["bn"]["vs_ddp_bn"] == 1.0
    table = (out / "speed_quick.md").read_text()
    assert "trainer step / hand-written loop step" in table and "| syncbrn |" in table

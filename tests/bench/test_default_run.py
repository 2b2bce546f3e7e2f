"""bench/default_run.py trains the default config per seed, keeps one file per seed and
writes the table the README shows."""

import json

from tests.helpers import FAST_DET, run_bench


def test_smoke_run_records_the_final_eval_and_reuses_its_cell(tmp_path, data_root):
    out = tmp_path / "out"
    args = ["--seeds", "0", "--out", out, "--set", *FAST_DET, f"data.root={data_root}"]
    proc = run_bench("default_run.py", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((out / "default_run.json").read_text())
    assert row["seed"] == 0 and row["step"] == 4 and row["seconds"] > 0
    assert 0.0 <= row["mAP"] <= row["mAP50"] <= 1.0
    table = (out / "default_run.md").read_text()
    assert f"| 0 | 4 | {row['mAP50']:.3f} | {row['mAP']:.3f} |" in table
    (out / "default_run.md").unlink()
    again = run_bench("default_run.py", *args, timeout=60)  # the cell is reused: no training
    assert again.returncode == 0 and (out / "default_run.md").read_text() == table

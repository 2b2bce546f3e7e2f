"""The small-batch study: its quick mode end to end, and the property its SyncBN line
rests on (2 processes x B train exactly like 1 process at 2B)."""

import json
import subprocess
import sys

import pytest

from tests.trainer.conftest import PY, ROOT, subprocess_env
from tests.trainer.wandb_reader import history

sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/norms.py is not `norms`
import study  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_data")
    return str(study.load_tensors(root, num_train=32, num_val=12, size=32))


def cell(norm: str, batch: int) -> dict:
    return dict(
        norm=norm,
        batch=batch,
        seed=0,
        samples=32,
        optimizer="adamw",
        lr=2e-3,
        ref_batch=32,
        lr_scaling="sqrt",
        weight_decay=5e-4,
    )


def test_syncbn_two_processes_train_like_bn_at_twice_the_batch(tiny_data, tmp_path):
    sync = study.run_sync(cell("syncbn", 4), tiny_data, tmp_path)
    single = study.train_cell(cell("bn", 8), tiny_data)
    assert sync["world_size"] == 2 and sync["steps"] == single["steps"] == 4
    assert sync["weights_l2"] == pytest.approx(single["weights_l2"], rel=1e-5)
    assert sync["acc"] == pytest.approx(single["acc"], abs=1 / 12 + 1e-9)
    # ... and a different batch really trains differently (the fingerprint can fail).
    other = study.train_cell(cell("bn", 4), tiny_data)
    assert other["weights_l2"] != pytest.approx(single["weights_l2"], rel=1e-5)


def test_quick_mode_writes_table_plot_json_and_wandb(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env()
    env["WANDB_MODE"] = "offline"
    proc = subprocess.run(
        [
            PY,
            str(ROOT / "bench" / "study.py"),
            "--quick",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "study_quick.json").read_text())
    runs = result["runs"]
    assert {(r["norm"], r["batch"]) for r in runs} == {
        (n, b) for n in ("bn", "brn", "gn", "syncbn") for b in (16, 2)
    }
    for r in runs:
        assert 0.0 <= r["acc"] <= 1.0
        assert r["steps"] == 256 // (r["batch"] * r["world_size"])
        assert r["world_size"] == (2 if r["norm"] == "syncbn" else 1)
    # The auto line is the policy's pick for one process: BN at 16, Batch Renorm at 2.
    summary = result["summary"]
    assert summary["auto"]["16"]["kind"] == "bn" and summary["auto"]["2"]["kind"] == "brn"
    assert summary["auto"]["2"]["mean"] == summary["brn"]["2"]["mean"]
    table = (out / "study_quick.md").read_text()
    for label in ("| BN |", "| Batch Renorm |", "| GN + WS |", "| SyncBN (2 procs) |", "auto"):
        assert label in table
    assert "B=16" in table and "B=2" in table
    assert "Validation cross-entropy" in table
    for r in runs:
        assert r["val_loss"] > 0

    # The report can be redone from the saved JSON alone, identically.
    again = tmp_path / "again"
    render = ["--render-only", str(out / "study_quick.json"), "--out", str(again), "--no-wandb"]
    assert study.main(render) == 0
    assert (again / "study_quick.md").read_text() == table

    import matplotlib.image

    png = out / "study_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[2] in (3, 4)

    [run_dir] = (out / "wandb").glob("offline-run-*")
    [log] = run_dir.glob("run-*.wandb")
    logged = {k: v for row in history(log) for k, v in row.items()}
    assert logged.get("runs/_type") == "table-file"
    assert "accuracy_vs_batch/_type" in logged and "plot/_type" in logged


def test_bad_arguments_are_refused_before_training(tmp_path):
    proc = subprocess.run(
        [PY, str(ROOT / "bench" / "study.py"), "--batches", "0", "--out", str(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--batches [0]" in proc.stderr

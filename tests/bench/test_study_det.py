"""bench/study_det.py --quick: real trainer runs per cell, resumable, the results schema."""

import dataclasses
import json

from tests.helpers import run_bench, subprocess_env
from tests.trainer.wandb_reader import wandb_runs
from trainer.config import BatchRenormConfig


def test_quick_detection_study_writes_schema_and_reuses_cells(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    lines = ["bn", "gn_ws", "auto", "syncbn", "auto2"]
    args = ["--quick", "--lines", *lines, "--out", out, "--data-root", data]
    env = {**subprocess_env(), "WANDB_MODE": "offline"}
    proc = run_bench("study_det.py", *args, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "study_det_quick.json").read_text())
    assert result["metric"].startswith("COCO mAP@.5")
    got = {(c["norm"], c["batch"], c["world"]): c for c in result["cells"]}
    one = {(n, b, 1) for n in ("bn", "gn_ws", "auto") for b in (8, 2)}
    assert set(got) == one | {("syncbn", 2, 2), ("auto", 2, 2)}
    # The policy on one process at 64 px (a 2x2 last stage): BN at 8 = min_batch, i.e.
    # the bn line's plan, so auto takes that run instead of repeating it; at 2, 8 values
    # per statistic: Batch Renorm with precise BN, a plan no other line has: its own run.
    assert got["auto", 8, 1]["picked"] == "bn"
    assert got["auto", 8, 1]["same_as"] == "bn"
    assert got["auto", 8, 1]["values"] == got["bn", 8, 1]["values"]
    assert got["auto", 2, 1]["picked"] == "brn+precise_bn"
    assert "same_as" not in got["auto", 2, 1]
    # On 2 processes of 2: 4 images x 4 = 16 values per statistic: synchronized Batch
    # Renorm with precise BN (2 < min_batch per device), which the syncbn line is not.
    assert got["auto", 2, 2]["picked"] == "syncbrn+precise_bn"
    assert "same_as" not in got["auto", 2, 2]
    for c in result["cells"]:
        assert c["seeds"] == [0]
        assert all(0 <= v <= 100 for v in c["values"] + c["values_map_50_95"])
    runs = {(r["line"], r["batch"]): r for r in result["runs"]}
    assert runs["bn", 2]["kinds"]["backbone"] == "bn" and not runs["bn", 2]["precise_bn"]
    # The policy's Batch Renorm cell records the settings it ran with, as the brn line's do
    # (a new default reruns it).
    assert runs["auto", 2]["brn"] == dataclasses.asdict(BatchRenormConfig())
    assert runs["auto", 2]["precise_bn"] and "brn" not in runs["bn", 2]
    assert runs["gn_ws", 2]["ws"] == {"backbone": True, "neck": True, "head": True}
    assert runs["syncbn", 2]["world"] == 2 and runs["syncbn", 2]["kinds"]["neck"] == "syncbn"
    assert runs["auto2", 2]["world"] == 2 and runs["auto2", 2]["brn"] == runs["auto", 2]["brn"]
    table = (out / "study_det_quick.md").read_text()
    assert "mAP@[.5:.95] (%)" in table and "paired by seed" in table
    # each auto line is held to the best line of as many processes
    verdict = {
        (row.split(" | ")[0], row.split(" | ")[1]): row.split(" | ")[3].split()[0]
        for row in table.split("paired by seed")[1].splitlines()
        if row.startswith(("| auto | ", "| auto2 | "))
    }
    assert verdict[("| auto", "8")] in ("bn", "gn_ws")
    assert verdict[("| auto", "2")] in ("bn", "gn_ws")
    assert verdict[("| auto2", "2")] == "syncbn"
    png = (out / "study_det_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # One wandb run per training run, grouped per cell; auto's runs are gn_ws's, not
    # logged twice.
    logged = wandb_runs(out / "wandb")
    assert set(logged) == {f"det_{n}_b{b}_s0" for n in ("bn", "gn_ws") for b in (8, 2)} | {
        "det_auto_b2_s0",
        "det_syncbn_b2_s0",
        "det_auto2_b2_s0",
    }
    assert logged["det_syncbn_b2_s0"]["group"] == "det_syncbn_b2_w2"
    assert logged["det_bn_b8_s0"]["history"]["mAP50"] == runs["bn", 8]["mAP50"]
    again = run_bench("study_det.py", *args, timeout=300, env=env)
    assert again.returncode == 0 and "7 of 7 cells already in" in again.stdout
    assert "wandb: 0 new runs" in again.stdout
    # --report-only trains nothing: a missing cell stays missing from the report
    (out / "study_det_quick_cells" / "gn_ws_b8_s0.json").unlink()
    report = run_bench("study_det.py", *args, "--report-only", timeout=300)
    assert report.returncode == 0 and "6 of 7 cells already in" in report.stdout
    assert not (out / "study_det_quick_cells" / "gn_ws_b8_s0.json").exists()
    result = json.loads((out / "study_det_quick.json").read_text())
    assert ("gn_ws", 8) not in {(c["norm"], c["batch"]) for c in result["cells"]}
    assert "(n=1)" in (out / "study_det_quick.md").read_text()


def test_quick_scenes_study_trains_the_preset_at_its_sizing_with_a_curve(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["--preset", "scenes", "--quick", "--lines", "bn", "brn", "gn_ws", "auto", "--no-wandb"]
    proc = run_bench("study_det.py", *args, "--out", out, "--data-root", data, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "study_scenes_quick.json").read_text())
    assert result["meta"]["preset"] == "scenes" and "both orientations" in result["meta"]["data"]
    runs = {(r["line"], r["batch"]): r for r in result["runs"]}
    assert set(runs) == {(n, b) for n in ("bn", "brn", "gn_ws", "auto") for b in (8, 2)}
    # the preset's scenes, generated at their own size, not the 64-px shapes grid's
    assert next(data.glob("scenes_320px_32_8_s0_*")).is_dir()
    # At the preset's sizes B=2 still has 2 x 5 x 5 values per statistic: Batch Renorm
    # with precise BN, which is the brn line's run here (its lines get the trainer's own
    # precise-BN rule), so auto takes that run
    assert runs["auto", 2]["kinds"]["backbone"] == "brn" and runs["auto", 2]["precise_bn"]
    assert runs["auto", 2]["same_as"] == "brn" and runs["bn", 2]["precise_bn"]
    # the one-process B=8 runs of seed 0 (not auto: it is bn's run) evaluated along the
    # way; the last point is the run's final result
    for line in ("bn", "brn", "gn_ws"):
        curve = runs[line, 8]["curve"]
        assert [p[0] for p in curve] == [1, 2] and curve[-1][1] == runs[line, 8]["mAP50"]
    assert "curve" not in runs["bn", 2]
    table = (out / "study_scenes_quick.md").read_text()
    assert "against optimizer steps at B=8" in table and "standard error" in table


def test_the_step_floor_is_recorded_only_in_the_cells_where_it_binds():
    from bench.study_det import PRESETS, _cell, _parser, _resolve, overrides

    args = _resolve(_parser(), ["--samples", "4000", "--min-steps", "500"])
    assert PRESETS["shapes"].batches[0] == 16
    b16 = _cell(args, "bn", 16, 0, {})
    b8 = _cell(args, "bn", 8, 0, {})
    assert b16["min_steps"] == 500 and "min_steps" not in b8
    assert "train.max_steps=500" in overrides(b16, "x") and "train.max_steps=500" in overrides(
        b8, "x"
    )  # B=16 would have had 250 steps of 4000 samples
    assert "train.max_steps=4000" in overrides(_cell(args, "bn", 1, 0, {}), "x")

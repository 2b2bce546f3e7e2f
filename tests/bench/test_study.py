"""The small-batch study: its quick mode end to end, and the property its SyncBN line
rests on (2 processes x B train exactly like 1 process at 2B)."""

import json

import pytest

from bench import study, study_report
from norms import NormPolicy
from tests.helpers import run_bench, subprocess_env
from tests.trainer.wandb_reader import history, wandb_runs


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
        min_steps=6,  # binds at a global batch of 8 (32 // 8 = 4 steps), not at 4
        optimizer="adamw",
        lr=2e-3,
        ref_batch=32,
        lr_scaling="sqrt",
        weight_decay=5e-4,
    )


@pytest.mark.parametrize("two,one", [("syncbn", "bn"), ("syncbrn", "brn_m01"), ("gn", "gn")])
def test_two_processes_train_like_one_at_twice_the_batch(tiny_data, tmp_path, two, one):
    # What lets the report read a 2-process line from the 1-process cell at 2B.
    sync = study.run_sync(cell(two, 4), tiny_data, tmp_path)
    single = study.train_cell(cell(one, 8), tiny_data)
    # The step floor counts global steps: 2 x 4 and 1 x 8 both get min_steps.
    assert sync["world_size"] == 2 and sync["steps"] == single["steps"] == 6
    assert sync["weights_l2"] == pytest.approx(single["weights_l2"], rel=1e-5)
    assert sync["acc"] == pytest.approx(single["acc"], abs=1 / 12 + 1e-9)
    if "acc_precise" in single:  # precise BN slices the same global batches
        assert sync["acc_precise"] == pytest.approx(single["acc_precise"], abs=1 / 12 + 1e-9)
    # ... and a different batch really trains differently (the fingerprint can fail).
    other = study.train_cell(cell(one, 4), tiny_data)
    assert other["steps"] == 8  # 32 // 4 is above the floor: the sample budget rules
    assert other["weights_l2"] != pytest.approx(single["weights_l2"], rel=1e-5)


def test_negative_min_steps_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        study.main(["--min-steps", "-1", "--out", "/nonexistent"])
    assert "--min-steps must be >= 0, got -1" in capsys.readouterr().err


def test_quick_mode_writes_table_plot_json_and_wandb(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env()
    env["WANDB_MODE"] = "offline"
    data = tmp_path / "data"
    proc = run_bench("study.py", "--quick", "--out", out, "--data-root", data, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "study_quick.json").read_text())
    runs = result["runs"]
    assert {(r["norm"], r["batch"]) for r in runs} == {
        (n, b) for n in ("bn", "brn", "gn", "syncbn") for b in (16, 2)
    }
    for r in runs:
        assert 0.0 <= r["acc"] <= 1.0 and r["val_loss"] > 0
        assert r["steps"] == 256 // (r["batch"] * r["world_size"])
        assert r["world_size"] == (2 if r["norm"] == "syncbn" else 1)
    # The auto line is the policy's pick for one process: BN at 16, GroupNorm + WS at 2
    # (no BatchNorm-family layer, so no precise BN).
    summary = result["summary"]
    assert summary["auto"]["16"]["kind"] == "bn" and not summary["auto"]["16"]["precise"]
    assert summary["auto"]["2"]["kind"] == "gn" and not summary["auto"]["2"]["precise"]
    assert summary["auto"]["2"]["mean"] == summary["gn"]["2"]["mean"]
    assert summary["auto"]["16"]["mean"] == summary["bn"]["16"]["mean"]
    # Every BatchNorm-family run was also evaluated after precise BN; GN runs were not.
    for r in runs:
        assert ("acc_precise" in r) == (r["norm"] != "gn")
    # The results schema: one entry per (line, batch, world), one value per seed.
    assert result["metric"].startswith("validation accuracy")
    entries = {(c["norm"], c["batch"], c["world"]): c for c in result["cells"]}
    assert ("gn_ws", 2, 1) in entries and ("syncbn", 16, 2) in entries
    assert entries["auto", 2, 1]["picked"] == "gn"
    # Two processes: local BN at 16 (no partner needed), GN at 2 (= 1 process at 4, not
    # run here): no 2-process policy cell.
    assert not [k for k in entries if k[0] == "auto" and k[2] == 2]
    for c in result["cells"]:
        assert c["seeds"] == [0] and len(c["values"]) == 1 and 0 <= c["values"][0] <= 100
    table = (out / "study_quick.md").read_text()
    for label in ("| BN |", "| Batch Renorm |", "| GN + WS |", "| SyncBN (2 procs) |", "auto"):
        assert label in table
    assert "B=16" in table and "B=2" in table
    assert "Validation cross-entropy" in table
    assert "| Batch Renorm + precise BN |" in table and "| 2.0 (gn) |" not in table
    assert "The policy against the best line in each cell" in table
    # Batch Renorm runs carry their clip diagnostics; no other run does.
    for r in runs:
        assert ("brn_clip" in r) == (r["norm"] == "brn")
        if r["norm"] == "brn":
            assert r["brn_clip"]["r_dev"] > 0 and 0 <= r["brn_clip"]["r_clipped"] <= 1
            assert r["brn_clip"]["r_dev_worst_layer"] >= r["brn_clip"]["r_dev"]
    assert "| Batch Renorm | 2 |" in table and "| Batch Renorm | 16 |" in table

    # The report can be redone from the saved JSON alone, identically.
    def render(*files, out):
        args = ["--render-only", *map(str, files), "--out", str(out), "--no-wandb"]
        assert study.main(args) == 0
        return (out / "study_quick.md").read_text()

    assert render(out / "study_quick.json", out=tmp_path / "again") == table

    # Merging another run (here the SyncBN cells relabelled as SyncBRN) adds its line and the
    # 2-process policy line; merging the same run into the merged file changes nothing.
    extra = tmp_path / "extra.json"
    relabelled = [{**r, "norm": "syncbrn"} for r in runs if r["norm"] == "syncbn"]
    extra.write_text(json.dumps({"meta": result["meta"], "runs": relabelled}))
    once = render(out / "study_quick.json", extra, out=tmp_path / "merged")
    assert "| SyncBRN (2 procs) |" in once and "| SyncBRN (2 procs) |" not in table
    twice = render(tmp_path / "merged" / "study_quick.json", extra, out=tmp_path / "twice")
    assert twice == once

    import matplotlib.image

    png = out / "study_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = matplotlib.image.imread(png).shape
    assert channels in (3, 4) and width > height  # accuracy and loss side by side

    [run_dir] = (out / "wandb").glob("offline-run-*-summary-*")
    [log] = run_dir.glob("run-*.wandb")
    logged = {k: v for row in history(log) for k, v in row.items()}
    assert logged.get("runs/_type") == "table-file"
    assert logged.get("plot/_type") == "image-file"
    # wandb stores a custom line chart as its data table, one row per (line, batch):
    # bn, brn, gn, syncbn, their three precise-BN lines and the one-process policy line,
    # at B=16 and B=2.
    assert logged.get("accuracy_vs_batch_table/_type") == "table-file"
    assert logged.get("accuracy_vs_batch_table/nrows") == 8 * 2
    # ... and one run per training run, its cell as the group, its results logged.
    per_run = {k: v for k, v in wandb_runs(out / "wandb").items() if "summary" not in k}
    assert len(per_run) == 8
    assert per_run["cls_syncbn_b2_s0"]["group"] == "cls_syncbn_b2_w2"
    by_cell = {(r["norm"], r["batch"]): r for r in runs}
    for name, run in per_run.items():
        _, norm, b, _ = name.split("_")
        assert run["group"] == f"cls_{norm}_{b}_w{by_cell[norm, int(b[1:])]['world_size']}"
        assert run["history"]["acc"] == by_cell[norm, int(b[1:])]["acc"]

    # Finished cells are kept one file each; a rerun reuses them and trains nothing.
    assert len(list((out / "study_quick_cells").glob("*.json"))) == 8
    again = run_bench(
        "study.py", "--quick", "--out", out, "--data-root", data, "--no-wandb", timeout=300, env=env
    )
    assert again.returncode == 0 and "8 of 8 cells already in" in again.stdout
    assert json.loads((out / "study_quick.json").read_text())["runs"] == runs


def test_bad_arguments_are_refused_before_training(tmp_path):
    proc = run_bench("study.py", "--batches", "0", "--out", tmp_path, timeout=120)
    assert proc.returncode == 2 and "--batches [0]" in proc.stderr


def test_auto_lines_follow_the_policy_for_one_and_two_processes():
    # Synthetic cells: accuracy encodes (norm, batch), so each auto cell shows its source.
    code = {"bn": 0.1, "brn": 0.2, "brn_m01": 0.6, "gn": 0.3, "syncbn": 0.4, "syncbrn": 0.5}
    rows = [
        dict(norm=n, batch=b, seed=s, acc=code[n] + b / 1000, val_loss=1.0)
        for n in code
        for b in (16, 8, 4, 2)
        for s in (0, 1)
    ]
    policy = NormPolicy()  # min_batch 8, min_values 8
    batches = [16, 8, 4, 2]
    # A 1x1 last stage (the study's network): B values per statistic.
    cells = study_report.summarize(rows, batches, policy, spatial=1)
    # One process: BN from min_batch up, GroupNorm + WS below (4 and 2 values < 8).
    assert {b: c["kind"] for b, c in cells["auto"].items()} == {16: "bn", 8: "bn", 4: "gn", 2: "gn"}
    # Two processes: local BN at 16 and 8 (a rank's own batch is enough; no 2-process
    # cell), SyncBN while 2 x B >= min_batch, GroupNorm below, read from the 1-process GN
    # cell at 2 x B (the same run).
    assert {b: c["kind"] for b, c in cells["auto2"].items()} == {4: "syncbn", 2: "gn"}
    assert cells["auto2"][2]["mean"] == pytest.approx(0.304)
    assert cells["auto"][4]["mean"] == pytest.approx(0.304)
    assert cells["gn2"][2] == {**cells["gn"][4], "same_as": "gn, 1 process, B=4"}
    # measured 2-process cells (syncbn here) are used as they are
    assert "same_as" not in cells["syncbn"][4]
    assert cells["auto2"][4]["mean"] == pytest.approx(0.404)
    schema = {(c["norm"], c["batch"], c["world"]): c for c in study_report.schema(cells)["cells"]}
    assert schema["auto", 2, 2]["picked"] == "gn" and schema["gn_ws", 2, 2]["values"] == [30.4] * 2
    # Every 2-process line is world 2 in the JSON, its precise-BN twin included (a
    # "syncbn+pbn" labelled world 1 would read as a 1-process line beating auto).
    bn_runs = [{**r, "acc_precise": r["acc"], "val_loss_precise": 1.0} for r in rows[:8]]
    assert {r["norm"] for r in bn_runs} == {"bn"}
    cells = study_report.summarize(bn_runs, batches, policy, spatial=1)
    worlds = {(c["norm"], c["batch"]): c["world"] for c in study_report.schema(cells)["cells"]}
    assert worlds["syncbn+pbn", 4] == worlds["syncbn", 4] == 2
    assert worlds["bn+pbn", 8] == worlds["bn", 8] == 1

    # A 2x2 last stage: 4 B values, so Batch Renorm at 4 and 2 (16 and 8 values), read
    # from the line trained with the trainer's norm.brn defaults (brn_m01), and
    # synchronized Batch Renorm on 2 processes at 2 (4 x 4 = 16 values).
    cells = study_report.summarize(rows, batches, policy, spatial=4)
    assert {b: c["kind"] for b, c in cells["auto"].items()} == {
        16: "bn",
        8: "bn",
        4: "brn",
        2: "brn",
    }
    assert cells["auto"][2]["mean"] == pytest.approx(0.602)
    assert cells["auto2"][2]["kind"] == "syncbrn" and cells["auto2"][2]["mean"] == pytest.approx(
        0.502
    )
    # Without 2-process cells there is no 2-process line, and SyncBRN is read from the
    # trainer's Batch Renorm at 2B.
    local = study_report.summarize(
        [r for r in rows if r["norm"] in ("bn", "brn_m01")], batches, policy, spatial=4
    )
    assert set(local["auto"]) == {16, 8, 4, 2}
    assert local["auto2"][2]["same_as"] == "brn_m01, 1 process, B=4"
    assert local["auto2"][4]["same_as"] == "bn, 1 process, B=8"
    # ... and with no GN cells there is no pick where the policy wants GN.
    only_bn = [r for r in rows if r["norm"] == "bn"]
    assert set(study_report.summarize(only_bn, batches, policy, spatial=1)["auto"]) == {16, 8}


def test_report_names_the_batches_the_step_floor_raised():
    from bench.study_report import _budget

    floor = _budget({"samples": 24576, "min_steps": 1536}, [32, 16, 8])
    assert "at least 1536 optimizer steps" in floor and "B=32 sees 49152" in floor
    assert "B=16" not in floor  # 24576 // 16 = 1536 steps: the floor does not bind
    # Without a floor (or cells stored before it existed) only the sample budget shows.
    assert _budget({"samples": 24576}, [32, 16]) == "24576 training samples per run"
    assert _budget({"samples": 24576, "min_steps": 0}, [32], short=True) == (
        "24576 samples per run"
    )

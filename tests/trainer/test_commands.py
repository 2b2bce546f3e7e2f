"""After training: eval, predict, export, runs, and the normpilot console script."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST_CLS, FAST_DET, ROOT, subprocess_env, train_args
from trainer.cli import main
from trainer.inference import load_run, read_images


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs")
    # The detector with the policy's Batch Renorm (64 px, batch 2: 8 values per
    # statistic), so export's BRN -> BN path is covered; the classifier with its GroupNorm
    # + WS (32 px, batch 4: 4 values).
    for config, name, fast in (
        ("shapes_det.yaml", "det", FAST_DET),
        ("shapes_cls.yaml", "cls", FAST_CLS),
    ):
        args = train_args(ROOT / "configs" / config, out, data_root, name, *fast)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
    return out


def val_images(data_root, task, n=3):
    sub = "det" if task == "detection" else "cls"
    found = sorted(Path(data_root).glob(f"{sub}*/val/**/*.png"))
    assert found, f"no {task} images under {data_root}"
    return found[:n]


def test_eval_reproduces_the_final_eval_and_writes_eval_json(runs, capsys):
    assert main(["eval", "--run", str(runs / "det")]) == 0
    record = json.loads((runs / "det" / "eval.json").read_text())
    rows = [json.loads(x) for x in (runs / "det" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["checkpoint"].endswith("step_00000004.pt")
    assert record["metrics"] == rows[-1]["eval"]  # the same weights and statistics
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == record["metrics"]


def test_evaluator_equals_pycocotools_on_the_same_unrounded_predictions(runs):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torchvision.ops import box_convert

    from trainer.distributed import DistEnv
    from trainer.evaluate import evaluate
    from trainer.training import load_datasets

    run = load_run(runs / "det")
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    _, val = load_datasets(run.cfg, env)
    ours = evaluate(run.model, val, env, task="detection", batch=8, workers=0)
    samples = [val[i] for i in range(len(val))]
    with torch.no_grad():
        outputs = run.model([image for image, _ in samples])
    before = [o["boxes"].clone() for o in outputs]
    results = [
        {
            "image_id": target["image_id"],
            "category_id": val.label_to_cat[int(lab)],
            "bbox": box.tolist(),
            "score": float(s),
        }
        for (_, target), out in zip(samples, outputs, strict=True)
        for box, lab, s in zip(
            box_convert(out["boxes"], "xyxy", "xywh"), out["labels"], out["scores"], strict=True
        )
        if int(lab) in val.label_to_cat  # label 0 is the background class
    ]
    assert all(torch.equal(o["boxes"], b) for o, b in zip(outputs, before, strict=True))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val.ann_file))
        e = COCOeval(gt, gt.loadRes(results), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    assert ours["mAP"] == pytest.approx(e.stats[0], abs=1e-12)
    assert ours["mAP50"] == pytest.approx(e.stats[1], abs=1e-12)


def test_predict_detection_maps_back_to_the_dataset_categories(runs, data_root, tmp_path):
    images = val_images(data_root, "detection")
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--run",
                str(runs / "det"),
                *map(str, images),
                "--score-thresh",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    preds = json.loads((out / "predictions.json").read_text())
    ann = json.loads(next(Path(data_root).glob("det*/annotations/instances_val.json")).read_text())
    names = {c["id"]: c["name"] for c in ann["categories"]}
    # the images sit in the COCO layout: their ids are the annotation file's
    ids = {Path(im["file_name"]).name: im["id"] for im in ann["images"]}
    assert preds and all(p["image_id"] == ids[Path(p["file_name"]).name] for p in preds)
    for p in preds:
        assert names[p["category_id"]] == p["category_name"] and len(p["bbox"]) == 4
    for image in images:
        assert (out / f"{image.stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_classification_top_k_json_and_csv(runs, data_root, tmp_path):
    images = val_images(data_root, "classification")
    out = tmp_path / "pred"
    folder = images[0].parent.parent
    assert (
        main(
            [
                "predict",
                "--run",
                str(runs / "cls"),
                f"{folder}/*/*.png",
                "--top-k",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    preds = json.loads((out / "predictions.json").read_text())
    classes = sorted(p.name for p in folder.iterdir())
    assert len(preds) == len(list(folder.glob("*/*.png")))
    for p in preds:
        assert len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
        assert all(t["name"] == classes[t["class"]] for t in p["top_k"])
    assert (out / "predictions.csv").read_text().startswith("file_name,rank,class,name,probability")


def test_predict_refuses_missing_images_with_a_message(runs, capsys):
    assert main(["predict", "--run", str(runs / "det"), "/nowhere/*.png"]) == 2
    assert "no image matches '/nowhere/*.png'" in capsys.readouterr().err


BLOCKED = """
import sys, json, torch
import torchvision  # registers torchvision's ops (nms) that the detection program calls
for name in ("norms", "trainer"):
    sys.modules[name] = None  # any import of the project now fails
path = sys.argv[1]
program = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    out = program(inputs["images"]) if inputs["task"] == "detection" else program(inputs["batch"])
torch.save(out[1] if inputs["task"] == "detection" else out, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["det", "cls"])
def test_export_runs_without_the_project_and_matches_the_checkpoint(
    runs, data_root, tmp_path, name
):
    assert main(["export", "--run", str(runs / name), "--out", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "model.json").read_text())
    run = load_run(runs / name)
    ckpt_size = run.checkpoint.stat().st_size
    assert (tmp_path / "weights.pt").stat().st_size <= ckpt_size / 2
    images = read_images(val_images(data_root, spec["task"], n=2))
    if spec["task"] == "detection":
        inputs = {"task": "detection", "images": images}
        with torch.no_grad():
            expected = run.model(images)
    else:
        from torchvision.transforms.v2 import functional as TF

        batch = torch.stack([TF.normalize(im, **spec["normalize"]) for im in images])
        inputs = {"task": "classification", "batch": batch}
        with torch.no_grad():
            expected = run.model(batch)
    torch.save(inputs, tmp_path / "inputs.pt")
    # every program the export wrote: the classifier's .pt2 (torch.export) and .ts, the
    # detector's .ts (model.json says why it has no .pt2)
    programs = [spec["program"]] + ([spec["exported_program"]] if spec["exported_program"] else [])
    assert programs == (["model.ts"] if name == "det" else ["model.ts", "model.pt2"])
    assert (spec["exported_program_missing"] is None) == (name == "cls")
    for program in programs:
        got = _run_blocked(tmp_path / program, tmp_path)
        if spec["task"] == "detection":
            for g, e in zip(got, expected, strict=True):
                for k in ("boxes", "scores", "labels"):
                    torch.testing.assert_close(g[k], e[k], rtol=1e-4, atol=1e-4)
            assert spec["norms"]["backbone"] == "bn"  # Batch Renorm exported as BatchNorm
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if name == "cls":  # the exported program takes another batch size
        other = torch.rand(3, *batch.shape[1:])
        torch.save({"task": "classification", "batch": other}, tmp_path / "inputs.pt")
        with torch.no_grad():
            expected = run.model(other)
        got = _run_blocked(tmp_path / "model.pt2", tmp_path)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _run_blocked(program: Path, tmp_path: Path):
    """The program's outputs on tmp_path/inputs.pt, in a process that cannot import the
    project."""
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(program), str(tmp_path / "inputs.pt"), str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_runs_lists_every_run_and_the_console_script_works(runs):
    script = Path(sys.executable).parent / "normpilot"
    proc = subprocess.run(
        [str(script), "runs", "--root", str(runs)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "step", "checkpoint", "last"]
    det = next(x for x in lines if x.startswith("cls ") or x.startswith("det "))
    assert "step_00000004.pt" in det and "backbone:" in det


def test_runs_reads_checkpoint_metadata_without_the_tensors(runs, monkeypatch, capsys):
    """``runs`` memory-maps each checkpoint (no tensor is read) and skips the CRC pass,
    which reads the whole file; eval/train keep both."""
    calls = []
    real_load = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr("trainer.checkpoint.torch.load", load)
    monkeypatch.setattr(
        "zipfile.ZipFile.testzip", lambda self: pytest.fail("runs ran the CRC pass")
    )
    assert main(["runs", "--root", str(runs)]) == 0
    assert calls == [True, True] and "step_00000004.pt" in capsys.readouterr().out


@pytest.mark.dist
def test_eval_under_torchrun_shards_the_val_set_and_agrees(runs):
    from tests.helpers import run, torchrun_cmd

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", "--run", str(runs / "det")]) == 0
    single = json.loads((runs / "det" / "eval.json").read_text())["metrics"]
    # --run-dir: torchrun would take "--run" for its own --run-path
    run(torchrun_cmd(2, "-m", "trainer", "eval", "--run-dir", str(runs / "det")), timeout=300)
    record = json.loads((runs / "det" / "eval.json").read_text())
    assert record["metrics"] == pytest.approx(single)  # 2 shards, the same 8 images
    assert record["metrics"]["images"] == 8

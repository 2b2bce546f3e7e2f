"""Bad input fails with a clear error naming the file or key, and leaves earlier
checkpoints untouched."""

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import FAST_DET, ROOT, run, torchrun_cmd, train_args, train_cmd
from trainer.cli import main
from trainer.data.shapes import ensure_shapes

DET = str(ROOT / "configs/shapes_det.yaml")


@pytest.fixture
def coco_copy(tmp_path, data_root):
    """A private COCO-format copy of the tiny shapes set, free to corrupt."""
    src = ensure_shapes(data_root, "detection", 24, 8, 64)
    dst = tmp_path / "coco"
    shutil.copytree(src, dst)
    return dst


def train_coco(root, tmp_path, *extra):
    return main(coco_args(root, tmp_path, *extra))


def coco_args(root, tmp_path, *extra) -> list[str]:
    return train_args(DET, tmp_path / "runs", root, "bad", *FAST_DET, "data.dataset=coco", *extra)


def test_missing_dataset_path(tmp_path, capsys):
    assert train_coco(tmp_path / "nowhere", tmp_path) == 2
    assert (
        f"dataset root {tmp_path / 'nowhere'} (data.root) does not exist" in capsys.readouterr().err
    )


def test_empty_dataset(coco_copy, tmp_path, capsys):
    ann = coco_copy / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({**data, "images": [], "annotations": []}))
    assert train_coco(coco_copy, tmp_path) == 2
    assert f"annotation file {ann} lists no images" in capsys.readouterr().err


def test_corrupt_annotation_file(coco_copy, tmp_path, capsys):
    ann = coco_copy / "annotations" / "instances_val.json"
    ann.write_text('{"images": [')
    assert train_coco(coco_copy, tmp_path) == 2
    assert f"annotation file {ann} is not valid JSON" in capsys.readouterr().err


def test_image_listed_but_missing(coco_copy, tmp_path, capsys):
    (coco_copy / "train" / "000003.png").unlink()
    assert train_coco(coco_copy, tmp_path) == 2
    assert "are missing from" in capsys.readouterr().err


def test_batch_larger_than_dataset(coco_copy, tmp_path, capsys):
    assert train_coco(coco_copy, tmp_path, "train.per_device_batch=64") == 2
    err = capsys.readouterr().err
    assert "train.per_device_batch=64" in err and "larger than the training set (24" in err


def test_num_classes_mismatch(coco_copy, tmp_path, capsys):
    assert train_coco(coco_copy, tmp_path, "model.num_classes=5") == 2
    assert "model.num_classes=5 but the training data has 3 classes" in capsys.readouterr().err


@pytest.mark.dist
def test_corrupt_image_fails_every_rank_without_hanging(coco_copy, tmp_path):
    for i in range(24):  # every training image is corrupt: whichever rank reads one fails
        (coco_copy / "train" / f"{i:06d}.png").write_bytes(b"not a png")
    cmd = torchrun_cmd(2, "-m", "trainer", *coco_args(coco_copy, tmp_path))
    with pytest.raises(AssertionError) as failed:
        run(cmd, timeout=120)  # a hang would raise TimeoutExpired instead
    assert "cannot read image" in str(failed.value) and str(coco_copy / "train") in str(
        failed.value
    )


def test_groupnorm_without_values_is_refused_before_the_run_folder(tmp_path, data_root, capsys):
    # 32 groups of 32 channels on the head's 1x1 P7 at 64 px: 1 value per group
    args = train_args(DET, tmp_path / "runs", data_root, "gn1", *FAST_DET)
    assert main([*args, "norm.policy.gn_groups=32"]) == 2
    err = capsys.readouterr().err
    assert "model.fpn_channels=32: the head's GroupNorm (32 groups)" in err
    assert not (tmp_path / "runs").exists()


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "change,message",
    [
        (["model.arch=retinanet_resnet18_fpn"], "is from model.arch='fcos_resnet18_fpn'"),
        (["model.fpn_channels=64"], "does not fit this model"),
        (["norm.override.neck=gn"], "has neck norm 'brn', this run's policy picks 'gn'"),
    ],
)
def test_checkpoint_from_another_model_is_refused_and_kept(
    tmp_path, data_root, capsys, change, message
):
    out = tmp_path / "runs"
    run(train_cmd(DET, out, data_root, "keep", *FAST_DET, "train.max_steps=2"))
    ckpts = out / "keep" / "checkpoints"
    before = _snapshot(ckpts)
    assert main(train_args(DET, out, data_root, "keep", *FAST_DET, *change)) == 2
    err = capsys.readouterr().err
    assert message in err and str(ckpts) in err
    assert _snapshot(ckpts) == before


def test_truncated_newest_checkpoint_is_skipped(tmp_path, data_root):
    out = tmp_path / "runs"
    run(train_cmd(DET, out, data_root, "trunc", *FAST_DET, "train.max_steps=4"))
    newest = out / "trunc" / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = run(train_cmd(DET, out, data_root, "trunc", *FAST_DET, "train.max_steps=4"))
    assert "skipping checkpoint: " in proc.stderr and "step_00000004.pt" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000002.pt" in proc.stdout


def _edit_annotations(coco_copy, split, edit):
    ann = coco_copy / "annotations" / f"instances_{split}.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return ann


def test_unknown_category_id_names_the_annotation(coco_copy, tmp_path, capsys):
    def edit(data):
        data["annotations"][0]["category_id"] = 7

    ann = _edit_annotations(coco_copy, "train", edit)
    first = json.loads(ann.read_text())["annotations"][0]["id"]
    assert train_coco(coco_copy, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"annotation {first} in {ann} has category_id 7" in err
    assert "the file's categories are [1, 2, 3]" in err


@pytest.mark.parametrize("bbox", [[10, 10, 0, 5], [10, 10, -3, 5], [50, 50, 40, 40]])
def test_bad_boxes_are_dropped_with_a_warning_or_refused(coco_copy, tmp_path, capsys, bbox):
    def edit(data):
        data["annotations"][0]["bbox"] = bbox

    _edit_annotations(coco_copy, "train", edit)
    with pytest.warns(UserWarning, match="dropped 1 box"):
        assert train_coco(coco_copy, tmp_path, "train.max_steps=1", "checkpoint.interval=1") == 0
    capsys.readouterr()
    assert train_coco(coco_copy, tmp_path, "data.bad_boxes=error", "run.name=strict") == 2
    err = capsys.readouterr().err
    assert "1 box(es)" in err and "empty or outside their image" in err and str(bbox) in err


def test_corrupt_image_is_found_at_start_up(coco_copy, tmp_path, capsys):
    (coco_copy / "val" / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert train_coco(coco_copy, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {coco_copy / 'val' / '000003.png'}" in err
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()  # nothing trained


def test_output_dir_that_is_a_file_is_named_before_anything_starts(tmp_path, data_root, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    args = ["train", "--config", DET, f"run.output_dir={blocker}", f"data.root={data_root}"]
    assert main([*args, *FAST_DET]) == 2
    err = capsys.readouterr().err
    assert f"run.output_dir={str(blocker)!r}: cannot write the run folder" in err


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 10\n  lr: [0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "YAML syntax error" in err
    line, col = err.split(f"{bad}:")[1].split(":")[:2]
    assert line.isdigit() and col.isdigit()


def test_junk_checkpoint_files_do_not_rotate_good_ones_out(tmp_path, data_root):
    out = tmp_path / "runs"
    ckpts = out / "j" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step_00000099.pt").write_text("not a checkpoint")
    (ckpts / ".step_00000003.pt.tmp").write_bytes(b"half written")
    args = train_args(DET, out, data_root, "j", *FAST_DET, "checkpoint.keep=1")
    with pytest.warns(UserWarning, match="named like checkpoints that are not: step_00000099.pt"):
        assert main(args) == 0
    names = sorted(p.name for p in ckpts.iterdir())
    # keep=1 kept the newest real checkpoint; the junk file did not count, and is left alone
    assert names == ["step_00000004.pt", "step_00000099.pt"]
    assert ".step_00000003.pt.tmp" not in names  # stale temporary file cleaned at start


def test_warmup_longer_than_the_run_warns(tmp_path, data_root, capsys):
    args = train_args(DET, tmp_path, data_root, "w", *FAST_DET, "train.warmup_steps=50")
    assert main(args) == 0
    assert "train.max_steps=4 < train.warmup_steps=50" in capsys.readouterr().err


def test_a_rank_whose_peer_died_says_one_line(monkeypatch, capsys, tmp_path, data_root):
    import torch.distributed as dist

    def peer_died(cfg, env, **kwargs):
        raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr("trainer.loop.train", peer_died)
    monkeypatch.setenv("RANK", "1")
    assert main(train_args(DET, tmp_path, data_root, "peer", *FAST_DET)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    expected = "error (rank 1): stopped because another rank failed (see the first error above)"
    assert err == [expected]


def test_the_failing_rank_keeps_its_traceback(monkeypatch, tmp_path, data_root):
    def broken(cfg, env, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("trainer.loop.train", broken)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="out of memory"):
        main(train_args(DET, tmp_path, data_root, "oom", *FAST_DET))

"""End-to-end training runs on the CPU: artifacts, checkpoints, resume, signals, torchrun."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    FAST_CLS,
    FAST_DET,
    PY,
    ROOT,
    metrics_rows,
    run,
    subprocess_env,
    torchrun_cmd,
    train_args,
    train_cmd,
)
from tests.trainer.wandb_reader import history
from trainer.checkpoint import list_checkpoints
from trainer.cli import main

DET = str(ROOT / "configs/shapes_det.yaml")
CLS = str(ROOT / "configs/shapes_cls.yaml")


def test_detection_run_artifacts_and_offline_wandb(tmp_path, data_root):
    out = tmp_path / "runs"
    # The policy at 64 px and batch 2 (2 x 2x2 = 8 values per statistic): Batch Renorm,
    # so this run also covers its metrics and precise BN.
    run(train_cmd(DET, out, data_root, "det", *FAST_DET, "wandb.mode=offline"))
    run_dir = out / "det"
    cfg = (run_dir / "config.yaml").read_text()
    assert "per_device_batch: 2" in cfg and "${" not in cfg
    policy = json.loads((run_dir / "policy.json").read_text())
    assert policy["world_size"] == 1 and policy["per_device_batch"] == 2
    assert {p: v["kind"] for p, v in policy["parts"].items()} == {
        "backbone": "brn",
        "neck": "brn",
        "head": "gn",
    }
    head = policy["parts"]["head"]
    assert {"kind", "ws", "impl", "reason", "sync_group_size", "rule", "values"} <= set(head)
    assert head["rule"] == "head_gn" and head["reason"].startswith("head: GroupNorm")
    backbone = policy["parts"]["backbone"]  # 64 px: a 2x2 last stage, 2 images
    assert (backbone["rule"], backbone["samples"], backbone["values"]) == ("values", 2, 8)
    metrics = metrics_rows(run_dir)
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"lr", "images_per_s", "brn_r_dev"} <= set(r) for r in steps)
    final = metrics[-1]["eval"]
    assert set(final) >= {"mAP", "mAP50"} and final["images"] == 8
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004.pt", "step_00000002.pt"]
    ck = torch.load(ckpts[0], weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "step",
        "epoch",
        "batch_in_epoch",
        "rng",
        "config",
        "policy",
        "wandb_id",
    } <= set(ck)
    assert ck["step"] == 4 and ck["policy"] == policy
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    # The offline wandb run exists and holds what was logged.
    [wandb_run] = list((run_dir / "wandb").glob("offline-run-*"))
    assert ck["wandb_id"] and wandb_run.name.endswith(ck["wandb_id"])
    logged = history(wandb_run / f"run-{ck['wandb_id']}.wandb")
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in steps})
    assert any(r.get("eval/images") == 8 for r in logged)
    # A few val images with their predicted boxes, at the eval.
    assert any(r.get("val/predictions/0/_type") == "image-file" for r in logged)
    assert any(r.get("policy/_type") == "table-file" for r in logged)
    assert any(k.startswith("brn/") and k.endswith("/r_dev") for r in logged for k in r)
    # Precise BN (auto: Batch Renorm at batch 2 < 16) before each save: its cost is logged,
    # the saved model carries the recalibrated statistics, the training averages ride along.
    assert policy["precise_bn"]["enabled"] and "2 < min_batch 8" in policy["precise_bn"]["reason"]
    cost = [r for r in metrics if "precise_bn_s" in r]
    assert [r["step"] for r in cost] == [2, 4] and all(r["precise_bn_batches"] == 12 for r in cost)
    assert any("precise_bn_s" in r for r in logged)
    key = "backbone.body.bn1.running_var"
    assert ck["bn_ema"][key].shape == ck["model"][key].shape
    assert not torch.allclose(ck["bn_ema"][key], ck["model"][key])


def test_classification_run(tmp_path, data_root, capsys):
    out = tmp_path / "runs"
    assert main(train_args(CLS, out, data_root, "cls", *FAST_CLS)) == 0
    run_dir = out / "cls"
    policy = json.loads((run_dir / "policy.json").read_text())
    assert list(policy["parts"]) == ["backbone"] and policy["parts"]["backbone"]["kind"] == "gn"
    assert policy["parts"]["backbone"]["ws"] and not policy["precise_bn"]["enabled"]
    final = metrics_rows(run_dir)[-1]["eval"]
    assert 0.0 <= final["top1"] <= 1.0 and final["images"] == 9
    assert "final eval" in capsys.readouterr().out


def _weights(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir / "checkpoints")[0], weights_only=True)["model"]


def _sigterm_after_step(cmd, run_dir: Path, step: int, timeout=120):
    """Start a run, SIGTERM it once metrics.jsonl shows ``step``; return the process."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= step for r in metrics_rows(run_dir)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=timeout)
    return proc, out


def test_sigterm_saves_then_resume_matches_uninterrupted_run(tmp_path, data_root):
    """SIGTERM mid-run saves a checkpoint at a step boundary and exits cleanly; the rerun
    resumes from it, and the final weights equal a run that was never interrupted."""
    common = [*FAST_DET, "train.max_steps=10", "checkpoint.interval=100", "run.deterministic=true"]
    out = tmp_path / "runs"
    run(train_cmd(DET, out, data_root, "straight", *common))

    name = "interrupted"
    proc, log = _sigterm_after_step(
        train_cmd(DET, out, data_root, name, *common), out / name, step=2
    )
    assert proc.returncode == 0, log
    assert "stop requested: checkpoint saved at step" in log
    [ckpt] = list_checkpoints(out / name / "checkpoints")
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= stopped_at < 10  # interrupted, not finished
    run(train_cmd(DET, out, data_root, name, *common))
    events = [r for r in metrics_rows(out / name) if "event" in r]
    assert [e["event"] for e in events] == ["preempted", "resume"]
    assert events[1]["step"] == stopped_at
    trained = [r["step"] for r in metrics_rows(out / name) if "loss" in r]
    assert trained == list(range(1, 11))  # every step once: nothing before the stop redone

    a, b = _weights(out / "straight"), _weights(out / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.dist
@pytest.mark.parametrize(
    # 64 px: a 2x2 last stage.  2 x 2 = 4 images < min_batch 8 but 16 values per
    # statistic: synchronized Batch Renorm; 2 x 4 = 8 images: SyncBN.
    "batch,kind,policy",
    [(2, "syncbrn", []), (4, "syncbn", [])],
)
def test_torchrun_two_processes(tmp_path, data_root, batch, kind, policy):
    out = tmp_path / "runs"
    extra = [f"train.per_device_batch={batch}", "data.num_train=32", "train.max_steps=2", *policy]
    run(torchrun_cmd(2, *train_cmd(DET, out, data_root, "ddp", *FAST_DET, *extra)[1:]))
    policy = json.loads((out / "ddp" / "policy.json").read_text())
    assert policy["world_size"] == 2
    assert policy["parts"]["backbone"]["kind"] == kind == policy["parts"]["neck"]["kind"]
    assert policy["parts"]["backbone"]["impl"] == "portable"
    assert metrics_rows(out / "ddp")[-1]["eval"]["images"] == 8  # padded repeats not counted


@pytest.mark.dist
def test_resume_two_processes_then_one(tmp_path, data_root):
    out = tmp_path / "runs"
    # 2 x 2 images at 64 px: synchronized Batch Renorm (16 values per statistic), then
    # Batch Renorm on one process (8): the BN-family state (running stats, BRN's step
    # count) is what has to survive the change of world size.
    extra = ["train.per_device_batch=2"]
    args = train_cmd(DET, out, data_root, "ws", *FAST_DET, *extra)[1:]
    run(torchrun_cmd(2, *args, "train.max_steps=2"))
    assert (
        json.loads((out / "ws" / "policy.json").read_text())["parts"]["backbone"]["kind"]
        == "syncbrn"
    )
    run([PY, *args, "train.max_steps=4"])
    policy = json.loads((out / "ws" / "policy.json").read_text())
    assert policy["world_size"] == 1 and policy["parts"]["backbone"]["kind"] == "brn"
    resume = [r for r in metrics_rows(out / "ws") if r.get("event") == "resume"]
    assert resume == [{"step": 2, "event": "resume", "world_size": 1}]
    assert (
        torch.load(list_checkpoints(out / "ws" / "checkpoints")[0], weights_only=True)["step"] == 4
    )


def test_fine_tuning_from_a_local_backbone_file_keeps_its_frozen_statistics(tmp_path, data_root):
    """The documented fine-tuning recipe: torchvision ResNet weights in a local file
    (nothing downloads), norm.policy.freeze_bn=true: the backbone's BN layers become
    FrozenBatchNorm2d holding the file's statistics, which training does not move, while
    its convolutions start from the file's weights and train."""
    from torchvision.models import resnet18

    torch.manual_seed(5)
    reference = resnet18()
    with torch.no_grad():  # statistics no fresh model has, so a copy is recognizable
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    weights = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), weights)
    tune = [f"model.backbone_weights={weights}", "norm.policy.freeze_bn=true"]
    args = train_args(DET, tmp_path / "runs", data_root, "ft", *FAST_DET, *tune)
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "ft"
    policy = json.loads((run_dir / "policy.json").read_text())
    assert policy["parts"]["backbone"]["kind"] == "frozenbn"
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    state = torch.load(newest, map_location="cpu", weights_only=True)["model"]
    body = "backbone.body."
    for key in ("bn1.running_mean", "layer4.1.bn2.running_var", "layer2.0.bn1.weight"):
        torch.testing.assert_close(state[body + key], reference.state_dict()[key])
    # the convolutions started from the file and trained on from there
    start = reference.state_dict()["layer4.1.conv2.weight"]
    trained = state[body + "layer4.1.conv2.weight"]
    assert not torch.equal(trained, start)
    assert (trained - start).abs().max() < 0.1 * start.abs().max()

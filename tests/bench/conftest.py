import subprocess

from tests.trainer.conftest import PY, ROOT, subprocess_env


def run_bench(script: str, *args, timeout: int, env: dict | None = None):
    """``python bench/<script> args...`` as a user runs it; the finished process."""
    return subprocess.run(
        [PY, str(ROOT / "bench" / script), *map(str, args)],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )

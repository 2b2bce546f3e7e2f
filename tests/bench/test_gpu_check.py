"""bench/gpu_check.py's dry run: the GPU acceptance script end to end on the CPU, every
CUDA part reported as skipped, the results schema written."""

import json

from tests.helpers import run_bench, subprocess_env


def test_gpu_check_dry_run_reports_every_cuda_part_skipped(tmp_path):
    env = {**subprocess_env(), "GPU_CHECK_DRY": "1"}
    proc = run_bench("gpu_check.py", "--out", tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert record["dry_run"] and record["environment"]["device"] == "cpu (dry run)"
    tests = record["cuda_tests"]
    # the CUDA tests were collected and each skipped itself: none ran, none failed
    assert tests["ok"] and tests["passed"] == 0 and tests["failed"] == 0 and tests["skipped"] >= 10
    names = [t["target"] for t in record["targets"]]
    assert {"graphed_speedup", "graphed_brn_vs_bn", "trainer_vs_hand"} <= set(names)
    assert all(t["status"] == "skipped (dry run)" and t["ratio"] is None for t in record["targets"])
    table = (tmp_path / "gpu_check_dry.md").read_text()
    assert table.count("| skipped (dry run) |") == len(names)
    assert not (tmp_path / "gpu_check.json").exists()  # a dry run never writes the real file


def test_a_failing_cuda_test_fails_the_check(monkeypatch):
    """The exit status follows the tests: a failed one (or an error) is a failed check."""
    from bench import gpu_check

    class Done:
        returncode, stdout, stderr = 1, "1 failed, 3 passed, 2 skipped in 9.1s", ""

    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: Done())
    result = gpu_check.run_cuda_tests(timeout=10)
    assert not result["ok"] and (result["failed"], result["passed"]) == (1, 3)

"""bench/models.py --quick runs end to end on the CPU and reports what it promises."""

import json

from tests.helpers import run_bench


def test_quick_cpu_run_reports_every_mode_and_ratio(tmp_path):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--quick", "--norms", "bn", "brn"]
    proc = run_bench(
        "models.py", *args, "--compile-backend", "aot_eager", "--out", out, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "models_cpu_quick.json").read_text())
    cases = {(r["case"], r["norm"]) for r in res["rows"]}
    assert cases == {(c, n) for c in ("resnet18_32_b2", "fcos_r18_64_b2") for n in ("bn", "brn")}
    for r in res["rows"]:
        assert set(r["ms"]) == {"eager", "compiled", "hand"}  # no graphs on the CPU
        assert all(v > 0 for v in r["ms"].values())
    table = (out / "models_cpu_quick.md").read_text()
    assert "| resnet18_32_b2 | brn | fp32 |" in table and "trainer / hand" in table


def test_cuda_is_refused_where_no_gpu_is_visible(tmp_path):
    # run_bench hides CUDA devices, so this holds on a GPU machine too.
    proc = run_bench("models.py", "--device", "cuda", "--out", tmp_path, timeout=120)
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr

"""The trainer reads nothing from the device between log points: in a profiler trace of
a real run, steps that are not log points hold no ``aten::_local_scalar_dense``."""

from torch.profiler import ProfilerActivity, profile

from tests.helpers import FAST_CLS, ROOT
from trainer.cli import main

CLS = ROOT / "configs/shapes_cls.yaml"


def test_steps_between_log_points_have_no_host_sync(tmp_path, data_root):
    args = [
        "train",
        "--config",
        str(CLS),
        f"run.output_dir={tmp_path}",
        "run.name=sync",
        f"data.root={data_root}",
        *FAST_CLS,  # per-device batch 4: the policy trains Batch Renorm, ramping limits
        "train.max_steps=6",
        "train.log_interval=3",
        "checkpoint.interval=100",
        "norm.brn.warmup_steps=100",
    ]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert main(args) == 0
    events = prof.events()
    steps = {
        int(e.name.split()[-1]): e.time_range for e in events if e.name.startswith("normpilot.step")
    }
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    reads = [e.time_range.start for e in events if e.name == "aten::_local_scalar_dense"]
    per_step = {s: sum(r.start <= t <= r.end for t in reads) for s, r in steps.items()}
    assert {s: n for s, n in per_step.items() if s not in (3, 6)} == {1: 0, 2: 0, 4: 0, 5: 0}
    assert per_step[3] >= 1  # the log point reads the loss: the trace does see host reads

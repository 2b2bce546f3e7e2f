"""No host syncs in the layers' training steps: a CPU profiler trace of forward+backward
holds no ``aten::_local_scalar_dense`` (what .item(), int(t), float(t), bool(t) record).
On a GPU each of those stalls the CPU until the GPU catches up, and breaks CUDA graphs."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from norms import BatchRenorm2d, SyncBatchNorm, SyncBatchRenorm, WSConv2d

SYNC_OP = "aten::_local_scalar_dense"


def host_reads(fn, steps: int = 3) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return sum(1 for e in prof.events() if e.name == SYNC_OP)


def test_the_profiler_sees_a_host_read():
    x = torch.randn(4)
    assert host_reads(lambda: x.sum().item()) == 3  # the check below can fail


LAYERS = {
    "brn_ramping": lambda: BatchRenorm2d(8, warmup_steps=100),
    "brn_no_ramp": lambda: BatchRenorm2d(8, warmup_steps=0),
    "brn_native": lambda: BatchRenorm2d(8, warmup_steps=100, impl="native"),
    "brn_cumulative": lambda: BatchRenorm2d(8, momentum=None, warmup_steps=10),
    "syncbrn_one_process": lambda: SyncBatchRenorm(8, warmup_steps=100),
    "syncbn_one_process": lambda: SyncBatchNorm(8),
    "wsconv": lambda: nn.Sequential(WSConv2d(8, 8, 3, padding=1)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_step_has_no_host_sync(name, dtype):
    layer = LAYERS[name]().to(dtype).train()
    x = torch.randn(4, 8, 6, 6, dtype=dtype, requires_grad=True)

    def step():
        layer(x).square().mean().backward()

    step()  # warm-up outside the trace
    assert host_reads(step) == 0


def test_brn_limits_still_ramp_on_the_device():
    layer = BatchRenorm2d(4, rmax=3.0, dmax=5.0, warmup_steps=4)
    x = torch.randn(8, 4, 3, 3)
    seen = []
    for _ in range(6):
        layer(x)
        seen.append(tuple(float(v) for v in layer.last_limits))
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]

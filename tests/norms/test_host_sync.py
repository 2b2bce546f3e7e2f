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


def _sync_worker(rank, world, out_dir):
    """Forward + backward of the synchronized layers over the gloo group, profiled after
    a warm-up: the host reads recorded, per layer kind (rank 0 writes them)."""
    import json
    from pathlib import Path

    torch.manual_seed(rank)
    counts = {}
    for name, make in (
        ("syncbn", lambda: SyncBatchNorm(8)),
        ("syncbn_cumulative", lambda: SyncBatchNorm(8, momentum=None)),
        ("syncbrn", lambda: SyncBatchRenorm(8, warmup_steps=100)),
        ("syncbrn_empty_shard", lambda: SyncBatchRenorm(8, warmup_steps=100)),
    ):
        layer = make().train()
        n = 0 if name.endswith("empty_shard") and rank == 1 else 4
        x = torch.randn(n, 8, 6, 6, requires_grad=True)

        def step(layer=layer, x=x):
            layer(x).square().mean().backward()

        step()
        counts[name] = host_reads(step)
    if rank == 0:
        (Path(out_dir) / "reads.json").write_text(json.dumps(counts))


def test_synchronized_training_step_has_no_host_sync(tmp_path):
    """The portable (gloo) route of SyncBN and SyncBRN keeps the group-wide count on the
    device: no host read per layer, an empty shard included."""
    import json

    from trainer.distributed import spawn_gloo

    spawn_gloo(_sync_worker, 2, str(tmp_path))
    reads = json.loads((tmp_path / "reads.json").read_text())
    assert reads == {k: 0 for k in reads} and len(reads) == 4, reads

"""CUDA paths: skipped cleanly on machines without a GPU (CI never has one)."""

import pytest
import torch
from torch import nn

from norms import BatchRenorm2d, SyncBatchNorm, SyncBatchRenorm, WSConv2d

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.cuda,  # what `pytest -m cuda` (make gpu-check) selects
]


@pytest.mark.parametrize("cls", [BatchRenorm2d, SyncBatchRenorm])
def test_batch_renorm_cuda_matches_cpu(cls):
    torch.manual_seed(0)
    cpu = cls(8, rmax=2.0, dmax=1.0, warmup_steps=2)
    gpu = cls(8, rmax=2.0, dmax=1.0, warmup_steps=2).cuda()
    for t in range(4):
        x = torch.randn(4, 8, 6, 6) * (1 + t) + t
        xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
        yc, yg = cpu(xc), gpu(xg)
        yc.square().sum().backward()
        yg.square().sum().backward()
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-3, atol=1e-3)


def test_batch_renorm_cuda_fp16_autocast_finite():
    layer = BatchRenorm2d(8, warmup_steps=0).cuda()
    x = (torch.randn(2, 8, 16, 16, device="cuda") * 100).requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_syncbn_single_gpu_is_batchnorm():
    sync, bn = SyncBatchNorm(8).cuda(), nn.BatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_wsconv_cuda():
    conv = WSConv2d(4, 8, 3).cuda()
    assert torch.isfinite(conv(torch.randn(1, 4, 8, 8, device="cuda"))).all()


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_batch_renorm_training_step_never_syncs(impl):
    """``auto`` on CUDA is the native-ops route; neither reads the device from the host."""
    layer = BatchRenorm2d(8, warmup_steps=100, momentum=None, impl=impl).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    layer(x).square().mean().backward()  # warm-up: cuDNN/handle initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(layer.num_batches_tracked) == 4

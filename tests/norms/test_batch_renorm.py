import pytest
import torch
from torch import nn

import norms
from norms import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from tests.norms.reference import batch_renorm_step, running_norm

EPS = 1e-5


def drifting_batches(steps, shape, seed=0):
    """Batches whose per-channel mean and scale move away from the running stats, so
    that r and d hit their clip limits in some channels and steps but not all."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    shift = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).view(view)
    scale = torch.linspace(0.3, 2.5, c, dtype=torch.float64).view(view)
    for t in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        yield (
            x * scale * (1 + 0.3 * t) + shift * (2 + t),
            torch.randn(shape, generator=g, dtype=torch.float64),
        )


def make_pair(cls, c, impl="auto", **kw):
    layer = cls(c, impl=impl, **kw).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, c))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, c))
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    state = {
        "mean": torch.zeros(c, dtype=torch.float64),
        "var": torch.ones(c, dtype=torch.float64),
        "nbt": 0,
    }
    return layer, w, b, state


@pytest.mark.parametrize(
    "cls,shape",
    [
        (BatchRenorm1d, (6, 5)),
        (BatchRenorm1d, (4, 5, 7)),
        (BatchRenorm2d, (4, 6, 5, 3)),
        (BatchRenorm3d, (2, 4, 3, 3, 2)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("impl", ["fused", "native"])
@pytest.mark.parametrize(
    "schedule",
    [dict(warmup_steps=3), dict(hold_steps=2, warmup_steps=6, d_warmup_steps=4)],
    ids=["ramp", "hold+two-ramps"],
)
def test_matches_reference_through_warmup_and_clipping(cls, shape, momentum, impl, schedule):
    c = shape[1]
    hp = dict(eps=EPS, momentum=momentum, rmax=2.0, dmax=1.5, **schedule)
    layer, w, b, state = make_pair(cls, c, impl=impl, **hp)
    r_clipped = d_clipped = r_free = 0
    for x, dy in drifting_batches(8, shape):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xa)
        (y * dy).sum().backward()
        y_ref = batch_renorm_step(xb, w, b, state, **hp)
        w.grad = b.grad = None
        (y_ref * dy).sum().backward()

        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, state["mean"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, state["var"], rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == state["nbt"]
        rmax_t, dmax_t = state["limits"]
        r_clipped += int(((state["r"] - rmax_t).abs() < 1e-12).sum())
        r_clipped += int(((state["r"] - 1 / rmax_t).abs() < 1e-12).sum())
        r_free += int(((state["r"] - 1).abs() > 1e-3).sum())
        d_clipped += int(((state["d"].abs() - dmax_t).abs() < 1e-12).sum()) if dmax_t else 0
    # The data must actually exercise the clip limits, or the test proves little.
    assert r_clipped > 0 and d_clipped > 0 and r_free > 0

    # Eval: running statistics, no buffer changes.
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = next(drifting_batches(1, shape, seed=1))[0]
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(
        y, running_norm(x, w.detach(), b.detach(), state["mean"], state["var"], EPS)
    )
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_warmup_zero_applies_full_limits_at_once():
    hp = dict(eps=EPS, momentum=0.1, rmax=3.0, dmax=5.0, warmup_steps=0)
    layer, w, b, state = make_pair(BatchRenorm2d, 4, **hp)
    x, _ = next(drifting_batches(1, (3, 4, 4, 4)))
    y = layer(x)
    torch.testing.assert_close(y, batch_renorm_step(x, w, b, state, **hp))
    assert layer.renorm_stats()["rmax_t"] == 3.0
    assert layer.renorm_stats()["d_abs"] > 0


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax1_dmax0_is_batchnorm(momentum):
    shape = (5, 6, 4, 4)
    brn = BatchRenorm2d(6, rmax=1.0, dmax=0.0, warmup_steps=0, momentum=momentum)
    bn = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    brn.load_state_dict(bn.state_dict())
    for x, dy in drifting_batches(4, shape):
        x = x.float()
        dy = dy.float()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), brn(xb)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(brn.state_dict()[k], v)
    bn.eval()
    brn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(brn(x), bn(x))


def test_untracked_stats_is_batchnorm_on_batch_stats():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    brn = BatchRenorm2d(3, track_running_stats=False, warmup_steps=0)
    assert brn.running_mean is None and brn.num_batches_tracked is None
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    for mode in (True, False):
        bn.train(mode)
        brn.train(mode)
        torch.testing.assert_close(brn(x), bn(x))


def test_state_dict_keys_match_batchnorm_and_load_both_ways():
    bn = nn.BatchNorm2d(8)
    brn = BatchRenorm2d(8)
    assert list(bn.state_dict()) == list(brn.state_dict())
    bn(torch.randn(4, 8, 3, 3))
    brn.load_state_dict(bn.state_dict())
    bn.load_state_dict(brn.state_dict())


def test_one_value_per_channel_raises_like_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(1, 3))


def test_wrong_input_rank_raises():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchRenorm2d(3)(torch.randn(2, 3))


@pytest.mark.parametrize("bad", [dict(rmax=0.5), dict(dmax=-1.0), dict(warmup_steps=-1)])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BatchRenorm2d(3, **bad)


def test_bf16_autocast_cpu_is_finite_and_close():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    brn = BatchRenorm2d(8, warmup_steps=0)
    ref = BatchRenorm2d(8, warmup_steps=0)
    x = torch.randn(4, 3, 8, 8) * 4 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = brn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all()
    assert torch.isfinite(brn.weight.grad).all() and torch.isfinite(conv.weight.grad).all()
    assert brn.running_mean.dtype == torch.float32
    y32 = ref(conv(x).detach())
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(brn.running_var, ref.running_var, rtol=0.02, atol=0.02)


def test_channels_last_matches_contiguous():
    x = torch.randn(4, 6, 5, 5) * 2
    a = BatchRenorm2d(6, warmup_steps=0)
    b = BatchRenorm2d(6, warmup_steps=0)
    a(x)
    b(x)  # same running stats, so r and d differ from 1 and 0 on the next step
    xa = (x * 3 + 1).requires_grad_()
    xb = (x * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    ya, yb = a(xa), b(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_renorm_stats_report_clipping():
    layer = BatchRenorm2d(4, rmax=1.5, dmax=0.5, warmup_steps=0)
    assert layer.renorm_stats() == {}
    layer(torch.randn(8, 4, 4, 4) * 5 + 10)  # far from running (0, 1): every channel clips
    s = layer.renorm_stats()
    assert s["r_clipped"] == 1.0 and s["d_clipped"] == 1.0
    assert s["d_abs"] == pytest.approx(0.5)
    assert s["r_dev"] == pytest.approx(0.5)


def test_diagnostics_stay_in_the_same_storage_where_graphs_replay(monkeypatch):
    """On CUDA the diagnostics are copied into tensors that persist (a graph replays into
    the storage it captured): forced here on the CPU, each forward must update the same
    tensors, and an eager forward at other limits (precise BN's rmax 1, dmax 0) must not
    leave the next forward reading its values."""
    monkeypatch.setattr(BatchRenorm2d, "_diagnostics_in_place", staticmethod(lambda r: True))
    layer = BatchRenorm2d(4, rmax=1.5, dmax=0.5, warmup_steps=0)
    layer(torch.randn(8, 4, 4, 4) * 5 + 10)
    kept = (layer.last_r.data_ptr(), layer.last_d.data_ptr(), layer.last_limits[0].data_ptr())
    assert layer.renorm_stats()["r_clipped"] == 1.0
    layer.rmax, layer.dmax = 1.0, 0.0  # as precise BN runs it
    layer(torch.randn(8, 4, 4, 4))
    assert layer.renorm_stats()["rmax_t"] == 1.0 and layer.renorm_stats()["d_abs"] == 0.0
    layer.rmax, layer.dmax = 1.5, 0.5
    layer(torch.randn(8, 4, 4, 4) * 5 + 10)
    s = layer.renorm_stats()
    assert s["rmax_t"] == 1.5 and s["d_clipped"] == 1.0
    assert kept == (
        layer.last_r.data_ptr(), layer.last_d.data_ptr(), layer.last_limits[0].data_ptr()
    )  # fmt: skip


def test_renorm_diagnostics_reads_every_trained_renorm_layer_by_name():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchRenorm2d(4, warmup_steps=0), nn.BatchNorm2d(4), BatchRenorm2d(4)
    )
    assert norms.renorm_diagnostics(model) == {}  # no training forward yet
    model(torch.randn(4, 3, 5, 5) * 3 + 1)
    diag = norms.renorm_diagnostics(model)
    assert list(diag) == ["1", "3"]  # Batch Renorm layers only, in module order
    assert diag["1"] == model[1].renorm_stats() and diag["1"]["rmax_t"] == 3.0
    assert diag["3"]["rmax_t"] == 1.0  # its warm-up has not started: still BatchNorm


def test_impl_is_checked():
    with pytest.raises(ValueError, match="impl must be 'auto', 'fused' or 'native'"):
        BatchRenorm2d(3, impl="triton")


def test_schedule_holds_then_ramps_r_and_d_separately():
    layer = BatchRenorm2d(4, rmax=3.0, dmax=4.0, hold_steps=2, warmup_steps=6, d_warmup_steps=4)
    seen = []
    for _ in range(8):
        layer(torch.randn(6, 4, 3, 3))
        seen += [float(v) for v in layer.last_limits]
    expected = [(1, 0), (1, 0), (1, 0), (1.5, 2), (2, 4), (2.5, 4), (3, 4), (3, 4)]
    assert seen == pytest.approx([v for pair in expected for v in pair])
    assert "hold_steps=2, d_warmup_steps=4" in repr(layer)
    with pytest.raises(ValueError, match="hold_steps must be >= 0"):
        BatchRenorm2d(4, hold_steps=-1)

"""norms.region: on a padded canvas, each prepared norm gives on the valid region what
the layer gives on that region alone (torch's and normpilot's own forwards on the
cropped tensor are the reference), and zeros outside it."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from norms import BatchRenorm2d, SyncBatchNorm
from norms.region import Padding, Region, halvings, mask_padding, valid_size


def test_halvings_and_valid_sizes_follow_stride_2_rounding():
    # a 224-px canvas: 112, 56, 28, 14, 7, then P6 4 and P7 2 (each stride-2 layer pads)
    assert [halvings(224, s) for s in (224, 112, 7, 4, 2)] == [0, 1, 5, 6, 7]
    # 160 valid rows: 5 at stride 32, ceil(160 / 64) = 3 at P6, 2 at P7
    assert [valid_size(224, 160, s) for s in (7, 4, 2)] == [5, 3, 2]
    with pytest.raises(ValueError, match="not a canvas of 224 halved"):
        halvings(224, 50)
    region = Region((64, 96))
    with pytest.raises(ValueError, match="does not fit the canvas"):
        region.set(96, 64)


def _layers():
    brn = BatchRenorm2d(6, warmup_steps=10, momentum=0.3)
    with torch.no_grad():  # mid-ramp, with running stats far from the batch's: r, d clip
        brn.running_mean[:3].fill_(3.0)
        brn.running_var[::2].fill_(0.1)
        brn.num_batches_tracked.fill_(6)
    frozen = FrozenBatchNorm2d(6)
    with torch.no_grad():
        frozen.bias.uniform_(0.5, 1)
    return {
        "bn": nn.BatchNorm2d(6),
        "bn_cumulative": nn.BatchNorm2d(6, momentum=None),
        "brn": brn,
        "gn": nn.GroupNorm(3, 6),
        "frozen": frozen,
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_a_norm_on_a_canvas_counts_only_its_region(name):
    torch.manual_seed(0)
    layer = _layers()[name].double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    ref = copy.deepcopy(layer)
    h, w = 5, 7
    x = torch.randn(3, 6, h, w, dtype=torch.float64) * 2 + 1
    # the canvas (8 x 12) holds x top-left; what lies outside must not count, so it is
    # filled with large values rather than zeros
    canvas = torch.full((3, 6, 8, 12), 50.0, dtype=torch.float64)
    canvas[..., :h, :w] = x
    canvas.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    dy = torch.randn(3, 6, 8, 12, dtype=torch.float64)

    padding = Padding()
    undo = mask_padding(layer, padding)
    region = Region((8, 12))
    with padding.on(region):
        region.set(h, w)
        out = layer(canvas)
    expect = ref(xr)
    (out * dy).sum().backward()
    (expect * dy[..., :h, :w]).sum().backward()

    torch.testing.assert_close(out[..., :h, :w], expect)
    assert out[..., h:, :].abs().max() == 0 and out[..., :, w:].abs().max() == 0
    torch.testing.assert_close(canvas.grad[..., :h, :w], xr.grad)
    assert canvas.grad[..., h:, :].abs().max() == 0
    for (key, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=key)
    for (key, a), (_, b) in zip(layer.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=key)  # running stats and step count alike
    if name == "brn":
        assert layer.renorm_stats() == pytest.approx(ref.renorm_stats())
        stats = ref.renorm_stats()
        assert stats["r_clipped"] > 0 and stats["d_clipped"] > 0  # the clips acted
    undo()
    assert "forward" not in vars(layer)
    torch.testing.assert_close(layer.eval()(x), ref.eval()(x))


def test_outside_an_active_region_layers_run_their_own_forwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2))
    ref = copy.deepcopy(model)
    mask_padding(model, Padding())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))


def test_a_synchronized_norm_is_refused_on_a_canvas():
    with pytest.raises(TypeError, match="SyncBatchNorm: a synchronized norm on a padded"):
        mask_padding(nn.Sequential(SyncBatchNorm(4)), Padding())

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norms import WSConv2d, convert_convs_to_ws
from tests.norms.reference import weight_standardize


@pytest.mark.parametrize("groups", [1, 2])
def test_wsconv_matches_formula_forward_and_backward(groups):
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, 3, padding=1, groups=groups, bias=True).double()
    with torch.no_grad():
        conv.weight.mul_(5).add_(0.3)  # far from standardized already
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_()
    y_ref = F.conv2d(x, weight_standardize(w, 1e-6), conv.bias, padding=1, groups=groups)
    y = conv(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad)


def test_eps_default_and_biased_variance_convention():
    conv = WSConv2d(2, 1, 1, bias=False)
    assert conv.eps == 1e-6
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))
    # mean 2, biased var 1 -> standardized weight (-1, 1)/sqrt(1 + 1e-6);
    # mmcv's unbiased std (sqrt 2) would give (-0.707, 0.707).
    y = conv(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    assert y.item() == pytest.approx(-1 / (1 + 1e-6) ** 0.5, rel=1e-6)


def test_convert_convs_to_ws_keeps_weights_and_attributes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)),
        nn.Linear(2, 2),
    )
    model[2][0].weight.requires_grad_(False)
    model.eval()
    weights = [model[0].weight, model[2][0].weight]
    out = convert_convs_to_ws(model, eps=1e-5)
    assert out is model
    convs = [model[0], model[2][0]]
    assert all(type(c) is WSConv2d for c in convs)
    assert type(model[3]) is nn.Linear
    for conv, w in zip(convs, weights, strict=True):
        assert conv.weight is w and conv.eps == 1e-5 and not conv.training
    assert model[0].stride == (2, 2) and model[0].bias is None
    assert model[2][0].dilation == (2, 2) and model[2][0].groups == 2
    assert not model[2][0].weight.requires_grad
    x = torch.randn(1, 3, 8, 8)
    expected = F.conv2d(x, weight_standardize(weights[0], 1e-5), None, stride=2, padding=1)
    torch.testing.assert_close(model[0](x), expected)
    # Converting twice is a no-op; a bare conv converts too.
    assert convert_convs_to_ws(model)[0] is convs[0]
    assert type(convert_convs_to_ws(nn.Conv2d(1, 1, 1))) is WSConv2d

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    SyncBatchNorm,
    SyncBatchRenorm,
    convert_norms,
    running_stat_layers,
)

BN_KINDS = {
    "bn": nn.BatchNorm2d,
    "brn": BatchRenorm2d,
    "syncbn": SyncBatchNorm,
    "syncbrn": SyncBatchRenorm,
    "frozenbn": FrozenBatchNorm2d,
}


def trained_resnet():
    """resnet18 whose BN layers hold non-trivial running statistics and affines."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.mark.parametrize("kind", list(BN_KINDS))
def test_resnet18_eval_output_unchanged(kind):
    model = trained_resnet()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        converted = convert_norms(model, kind)
        after = converted(x)
    layers = [m for m in converted.modules() if isinstance(m, BN_KINDS[kind])]
    assert len(layers) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules()) or kind == "bn"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_bn_brn_bn_round_trip_keeps_state_dict():
    model = trained_resnet()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    convert_norms(model, "brn", rmax=2.0)
    assert all(m.rmax == 2.0 for m in model.modules() if isinstance(m, BatchRenorm2d))
    convert_norms(model, "bn")
    sd = model.state_dict()
    assert list(sd) == list(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_carries_mode_dtype_requires_grad_and_hyperparameters():
    bn = nn.BatchNorm1d(6, eps=1e-3, momentum=None, affine=True).double()
    bn.weight.requires_grad_(False)
    bn.train()
    model = nn.Sequential(nn.Linear(4, 6), bn)
    convert_norms(model, "brn")
    new = model[1]
    assert type(new) is BatchRenorm1d  # input rank preserved
    assert new.eps == 1e-3 and new.momentum is None
    assert new.weight.dtype == torch.float64 and new.training
    assert not new.weight.requires_grad and new.bias.requires_grad


def test_shared_layer_stays_shared():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    convert_norms(model, "brn")
    assert model[0] is model[2] and isinstance(model[0], BatchRenorm2d)


def test_root_module_and_frozen_source():
    frozen = FrozenBatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        frozen.running_var.fill_(2.0)
        frozen.weight.fill_(3.0)
    new = convert_norms(frozen, "syncbn")
    assert isinstance(new, SyncBatchNorm) and new.eps == 1e-3
    assert torch.equal(new.running_var, frozen.running_var)
    assert torch.equal(new.weight.detach(), frozen.weight)


def test_gn_conversion_uses_choose_groups_and_keeps_affine():
    model = trained_resnet()
    w = model.bn1.weight.detach().clone()
    convert_norms(model, "gn")
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 20 and all(g.num_groups == 32 for g in gns)
    assert torch.equal(model.bn1.weight.detach(), w)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_none_removes_norms():
    model = convert_norms(trained_resnet(), "none")
    assert sum(isinstance(m, nn.Identity) for m in model.modules()) == 20


def test_errors():
    with pytest.raises(ValueError, match="unknown norm kind 'bogus'.*valid kinds"):
        convert_norms(nn.Sequential(nn.BatchNorm2d(3)), "bogus")
    with pytest.raises(ValueError, match="frozenbn exists only in 2d"):
        convert_norms(nn.BatchNorm1d(3), "frozenbn")


def test_running_stat_layers_are_the_learning_batch_norms():
    model = nn.Sequential(
        nn.BatchNorm2d(2),
        BatchRenorm2d(2),
        SyncBatchNorm(2),
        FrozenBatchNorm2d(2),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.GroupNorm(1, 2),
    )
    assert running_stat_layers(model) == [model[0], model[1], model[2]]

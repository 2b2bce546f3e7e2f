import warnings

import pytest
import torch
from torch import nn

from norms import BatchRenorm2d, NormPolicy, SyncBatchNorm, WSConv2d, select_norm
from tests.helpers import ROOT
from trainer.models import build_model


def plan(world, batch, override=None, **policy):
    p, override = NormPolicy(**policy), override or {}
    return {
        part: select_norm(world, batch, part, p, override=override.get(part))
        for part in ("backbone", "neck", "head")
    }


def norms_in(module, cls):
    return [m for m in module.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("arch", ["fcos_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_detector_parts_get_their_norms(arch):
    model = build_model(arch, 3, plan(1, 2, small_batch="brn"), image_size=64, fpn_channels=48)
    body, fpn, head = model.backbone.body, model.backbone.fpn, model.head
    assert len(norms_in(body, BatchRenorm2d)) == 20 and not norms_in(body, nn.BatchNorm2d)
    assert len(norms_in(fpn, BatchRenorm2d)) == 6  # 3 lateral + 3 output convs
    gns = norms_in(head, nn.GroupNorm)
    assert len(gns) == 8 and all(g.num_groups == 16 for g in gns)  # choose_groups(48)
    towers = [head.classification_head.conv, head.regression_head.conv]
    assert all(type(c) is WSConv2d for t in towers for c in t if isinstance(c, nn.Conv2d))
    assert type(head.classification_head.cls_logits) is nn.Conv2d  # predictors untouched
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_small_batch_default_gn_with_ws_on_body_and_fpn():
    model = build_model("fcos_resnet18_fpn", 3, plan(1, 2), image_size=64, fpn_channels=32)
    body, fpn = model.backbone.body, model.backbone.fpn
    assert len(norms_in(body, nn.GroupNorm)) == 20 and not norms_in(body, nn.BatchNorm2d)
    assert len(norms_in(fpn, nn.GroupNorm)) == 6
    # every conv that feeds a GroupNorm is standardized: the body's 20 (stem, blocks,
    # downsamples) and the FPN's 3 lateral + 3 output convs; P6/P7 feed none.
    assert len(convs(body)) == 20 and all(type(c) is WSConv2d for c in convs(body))
    fpn_ws = [c for c in convs(fpn) if type(c) is WSConv2d]
    assert len(fpn_ws) == 6 and all(type(c) is nn.Conv2d for c in convs(fpn.extra_blocks))
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    assert all(torch.isfinite(v) for v in model(images, targets).values())
    plain = build_model("fcos_resnet18_fpn", 3, plan(1, 2, gn_ws=False), image_size=64)
    assert not norms_in(plain.backbone, WSConv2d) and norms_in(plain.head, WSConv2d)


def test_small_batch_classifier_is_gn_with_ws():
    model = build_model("resnet18", 3, {"backbone": select_norm(1, 2)}, image_size=32)
    assert len(norms_in(model, nn.GroupNorm)) == 20
    assert all(type(c) is WSConv2d for c in convs(model)) and type(model.fc) is nn.Linear


def test_multi_gpu_plan_and_overrides():
    model = build_model(
        "fcos_resnet18_fpn",
        3,
        plan(8, 2, head_ws=False, override={"head": "bn"}),
        image_size=64,
        fpn_channels=32,
    )
    assert len(norms_in(model.backbone.body, SyncBatchNorm)) == 20
    assert len(norms_in(model.backbone.fpn, SyncBatchNorm)) == 6
    # 8 conv positions, one BN per FPN level each (the convs are shared across levels)
    assert len(norms_in(model.head, nn.BatchNorm2d)) == 40 and not norms_in(model.head, WSConv2d)


@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_a_bn_family_head_has_one_layer_per_level_counting_one_step_a_step(kind):
    """The head's convs are shared across the 5 FPN levels: with one shared BN-family
    layer, num_batches_tracked (Batch Renorm's ramp clock) would count 5 per step."""
    from norms import BatchRenorm2d, PerLevelNorm

    p = plan(1, 16, head_kind="same") if kind == "bn" else plan(1, 2, override={"head": kind})
    assert p["head"].kind == kind and not p["head"].ws
    model = build_model("fcos_resnet18_fpn", 3, p, image_size=64, fpn_channels=32)
    levels = norms_in(model.head, PerLevelNorm)
    assert len(levels) == 8 and all(len(m.levels) == 5 for m in levels)  # 2 towers x 4
    cls = BatchRenorm2d if kind == "brn" else nn.BatchNorm2d
    layers = norms_in(model.head, cls)
    assert len(layers) == 40
    model.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    for step in (1, 2):
        model(images, targets)
        assert all(int(m.num_batches_tracked) == step for m in layers), step
    first = levels[0].levels
    # each level keeps its own statistics (P3 and P7 see different maps)
    assert not torch.allclose(first[0].running_var, first[4].running_var)
    model.eval()
    model(images)
    assert all(int(m.num_batches_tracked) == 2 for m in layers)
    # a forward cut off half-way does not leave the levels out of step
    levels[0].reset()
    levels[0](torch.rand(2, 32, 4, 4))
    model.train()
    model(images, targets)
    assert all(int(m.num_batches_tracked) == 3 for m in layers)
    # exported (BN-family -> BN, TorchScript), each level keeps its own statistics
    from trainer.export import plain_model

    model.eval()
    x = [torch.rand(3, 64, 64)]
    want = model(x)[0]["scores"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(plain_model(model))
    for _ in range(2):  # the level count wraps by itself without the reset hook
        torch.testing.assert_close(scripted(x)[1][0]["scores"], want, rtol=1e-4, atol=1e-4)


def test_classifier_and_local_weights(tmp_path):
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pt"
    torch.manual_seed(3)
    reference = resnet18()
    torch.save(reference.state_dict(), weights)
    model = build_model(
        "resnet18",
        3,
        {"backbone": select_norm(1, 64)},
        image_size=32,
        backbone_weights=str(weights),
    )
    assert model.fc.out_features == 3
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    with pytest.raises(ValueError, match="model.backbone_weights: .* does not exist"):
        build_model(
            "resnet18",
            3,
            {"backbone": select_norm(1, 64)},
            image_size=32,
            backbone_weights=str(tmp_path / "missing.pt"),
        )


def test_gn_groups_setting_reaches_every_groupnorm_layer():
    """norm.policy.gn_groups is what the plan checks and the table shows; the layers must
    use it (they used choose_groups(C) whatever it said)."""
    from trainer.config import load_config
    from trainer.plan import plan_run
    from trainer.training import model_from_config

    det = ROOT / "configs/shapes_det.yaml"
    gn = ["norm.policy.small_batch=gn"]
    for extra, want in ((["norm.policy.gn_groups=16", "model.fpn_channels=32"], {16}), ([], {32})):
        cfg = load_config(det, [*gn, *extra])
        model = model_from_config(cfg, plan_run(cfg, 1, "cpu").parts)
        layers = norms_in(model, nn.GroupNorm)
        assert len(layers) > 20 and {g.num_groups for g in layers} == want

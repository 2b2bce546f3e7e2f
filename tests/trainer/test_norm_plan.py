"""What the run plan says beside the norms: precise BN's decision."""

import pytest

from tests.helpers import ROOT
from trainer.cli import main
from trainer.config import load_config
from trainer.norm_plan import plan_norms, precise_bn_plan

DET = ROOT / "configs/shapes_det.yaml"


def decide(world=1, *overrides):
    cfg = load_config(DET, list(overrides))
    return precise_bn_plan(cfg, plan_norms(cfg, world, "cpu", "gloo"))


@pytest.mark.parametrize(
    "world,overrides,enabled,reason",
    [
        # 32 px: a 1x1 last stage, 2 values per statistic: GN + WS
        (1, ["train.per_device_batch=2", "data.image_size=32"], False, "no part learns"),
        # 96 px: 3x3, 18 values: Batch Renorm
        (1, ["train.per_device_batch=2"], True, "backbone/neck learn running statistics"),
        (
            1,
            ["train.per_device_batch=2", "data.image_size=32", "norm.policy.small_batch=brn"],
            True,
            "backbone/neck learn running statistics",
        ),
        (1, ["train.per_device_batch=32"], False, "per_device_batch 32 >= min_batch 8"),
        (8, ["train.per_device_batch=2"], True, "per_device_batch 2 < min_batch 8"),  # syncbn
        (1, ["train.per_device_batch=2", "norm.precise_bn.enabled=false"], False, "=false"),
        (1, ["train.per_device_batch=32", "norm.precise_bn.enabled=true"], True, "=true"),
        (
            1,
            ["norm.override.backbone=gn", "norm.override.neck=gn", "train.per_device_batch=2"],
            False,
            "no part learns running stats",
        ),
        (1, ["norm.override.backbone=frozenbn", "norm.override.neck=none"], False, "no part"),
    ],
)
def test_precise_bn_decision(world, overrides, enabled, reason):
    plan = decide(world, *overrides)
    assert plan.enabled is enabled and reason in plan.reason


def test_bad_precise_bn_settings_name_the_key():
    for key, bad in (("enabled", "maybe"), ("num_batches", "0")):
        with pytest.raises(ValueError, match=f"norm.precise_bn.{key}"):
            load_config(DET, [f"norm.precise_bn.{key}={bad}"])


def test_policy_command_shows_precise_bn(capsys):
    args = ["train.per_device_batch=2", "norm.policy.small_batch=brn"]
    assert main(["policy", "--config", str(DET), *args]) == 0
    assert "precise BN: on, 50 batches (auto: backbone/neck learn" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config,size",
    [(DET, 64), (DET, 96), (DET, 100), (ROOT / "configs/shapes_cls.yaml", 32)],
)
def test_smallest_maps_are_what_the_norm_layers_see(config, size):
    # The policy counts batch x H x W at each part's smallest normalized map; measured
    # here on the built model, with hooks on its norm layers.
    import torch
    from torch import nn

    from trainer.models import build_model
    from trainer.norm_plan import smallest_maps

    cfg = load_config(config, [f"data.image_size={size}"])
    plan = plan_norms(cfg, 1, "cpu", "gloo")
    model = build_model(
        cfg.model.arch, 3, plan, image_size=size, fpn_channels=cfg.model.fpn_channels
    ).eval()
    if cfg.model.task == "detection":
        parts = {"backbone": model.backbone.body, "neck": model.backbone.fpn, "head": model.head}
    else:
        parts = {"backbone": model}
    seen = {part: [] for part in parts}
    for part, module in parts.items():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm):
                m.register_forward_hook(
                    lambda _m, args, _out, part=part: seen[part].append(args[0].shape[-2:].numel())
                )
    with torch.no_grad():
        images = torch.rand(2, 3, size, size)
        model(list(images)) if cfg.model.task == "detection" else model(images)
    assert smallest_maps(cfg) == {part: min(sizes) for part, sizes in seen.items()}

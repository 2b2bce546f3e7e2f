"""What the run plan says beside the norms: precise BN's decision."""

import pytest

from tests.helpers import ROOT
from trainer.cli import main
from trainer.config import load_config
from trainer.plan import plan_run

DET = ROOT / "configs/shapes_det.yaml"


def decide(world=1, *overrides):
    cfg = load_config(DET, list(overrides))
    return plan_run(cfg, world, "cpu", "gloo").precise


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

    cfg = load_config(config, [f"data.image_size={size}"])
    plan = plan_run(cfg, 1, "cpu", "gloo").parts
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
    counted = {part: h * w for part, (h, w) in plan_run(cfg, 1, "cpu").maps.items()}
    assert counted == {part: min(sizes) for part, sizes in seen.items()}


def test_groupnorm_with_one_value_per_group_is_refused_before_training():
    import torch
    from torch import nn

    # Why: 1 channel per group on a 1x1 map. torch raises on one image and, on two,
    # returns the bias alone: nothing of the input survives.
    gn = nn.GroupNorm(32, 32)
    nn.init.normal_(gn.bias)
    x = torch.randn(2, 32, 1, 1)
    bias = gn.bias.view(1, -1, 1, 1).expand_as(x)
    torch.testing.assert_close(gn(x), bias, rtol=0, atol=1e-3)
    torch.testing.assert_close(gn(5 * x + 1), bias, rtol=0, atol=1e-3)
    with pytest.raises(ValueError):
        gn(x[:1])
    # 32 FPN channels at the default 96 px: the head's P7 is 1x1 and choose_groups(32) = 32.
    cfg = load_config(DET, ["model.fpn_channels=32"])
    with pytest.raises(ValueError, match=r"model.fpn_channels=32: the head's GroupNorm") as e:
        plan_run(cfg, 1, "cpu", "gloo")
    assert "data.min_size=96, data.max_size=96" in str(e.value) and "gn_groups <= 16" in str(
        e.value
    )
    # 2 channels per group, or a 2x2 P7, are enough
    plan_run(
        load_config(DET, ["model.fpn_channels=32", "norm.policy.gn_groups=16"]), 1, "cpu", "gloo"
    )
    plan_run(load_config(DET, ["model.fpn_channels=32", "data.image_size=256"]), 1, "cpu", "gloo")
    # a neck forced to GN at 32 px (1x1 P5) is refused the same way
    bad = ["model.fpn_channels=32", "data.image_size=32", "norm.override.head=bn"]
    with pytest.raises(ValueError, match="the neck's GroupNorm"):
        plan_run(load_config(DET, [*bad, "norm.override.neck=gn"]), 1, "cpu", "gloo")
    # the default detector (64 channels: 2 per group) plans
    plan_run(load_config(DET, []), 1, "cpu", "gloo")


def test_batches_are_settled_once():
    from trainer.plan import Batches

    b = Batches(per_device=2, grad_accum=3, world_size=4)
    assert (b.global_, b.eval) == (24, 8)
    assert Batches(16, 1, 1).eval == 16


def test_the_planner_runs_once_per_start(tmp_path, data_root, monkeypatch):
    """The CLI's pre-check plans the run; train() runs on that plan."""
    import trainer.plan
    from tests.helpers import FAST_DET

    calls = []
    real = trainer.plan.plan_run

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    monkeypatch.setattr("trainer.plan.plan_run", counted)
    monkeypatch.setattr("trainer.loop.plan_run", counted)
    args = ["train", "--config", str(DET), f"run.output_dir={tmp_path}", "run.name=once"]
    assert main([*args, f"data.root={data_root}", *FAST_DET]) == 0
    assert calls == [(1, "cpu", "gloo", 1)]

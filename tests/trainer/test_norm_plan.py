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
        (1, ["train.per_device_batch=2"], False, "no part learns running stats"),  # GN + WS
        (
            1,
            ["train.per_device_batch=2", "norm.policy.small_batch=brn"],
            True,
            "backbone/neck learn running statistics",
        ),
        (1, ["train.per_device_batch=32"], False, "per_device_batch 32 >= min_batch 16"),
        (8, ["train.per_device_batch=2"], True, "per_device_batch 2 < min_batch 16"),  # syncbn
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

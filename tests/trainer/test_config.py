from pathlib import Path

import pytest
import torch

from trainer.config import Config, ConfigError, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_presets_exist_and_load():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in PRESETS}
    assert {"shapes_det.yaml", "shapes_cls.yaml"} <= names
    assert len(names) >= 4  # plus the documented 8-GPU and 1-GPU fine-tune examples
    for path in PRESETS:
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.run.name


def test_default_preset_is_fcos_on_shapes():
    cfg = load_config(ROOT / "configs/shapes_det.yaml")
    assert cfg.model.arch == "fcos_resnet18_fpn" and cfg.data.dataset == "shapes"
    assert cfg.wandb.mode == "offline"
    assert cfg.norm.override.backbone is None and cfg.norm.policy.min_batch == 8
    assert load_config(ROOT / "configs/shapes_cls.yaml").model.task == "classification"


def test_overrides_merge_on_top_with_yaml_types(tmp_path):
    cfg = load_config(
        ROOT / "configs/shapes_det.yaml",
        [
            "train.per_device_batch=2",
            "train.grad_accum=4",
            "norm.override.head=bn",
            "norm.policy.local_bn_batch=null",
            "checkpoint.interval=7",
            "wandb.mode=disabled",
            "run.output_dir=" + str(tmp_path),
        ],
    )
    assert cfg.train.per_device_batch == 2 and cfg.train.grad_accum == 4
    assert cfg.norm.override.head == "bn" and cfg.norm.policy.local_bn_batch is None
    assert cfg.checkpoint.interval == 7 and cfg.wandb.mode == "disabled"
    assert cfg.run.output_dir == str(tmp_path)


def test_interpolations_resolve_once_and_saved_config_is_resolved(tmp_path):
    preset = tmp_path / "c.yaml"
    preset.write_text("run:\n  name: b${train.per_device_batch}_x${train.grad_accum}\n")
    cfg = load_config(preset, ["train.per_device_batch=3"])
    assert cfg.run.name == "b3_x1"
    text = to_yaml(cfg)
    assert "${" not in text and "name: b3_x1" in text
    reloaded = tmp_path / "saved.yaml"
    reloaded.write_text(text)
    assert to_dict(load_config(reloaded)) == to_dict(cfg)


@pytest.mark.parametrize(
    "override,match",
    [
        (
            "train.per_devce_batch=2",
            r"unknown config key train.per_devce_batch.*did you mean train.per_device_batch",
        ),
        ("nosuch.key=1", r"unknown config key nosuch"),
        ("train.per_device_batch=abc", r"train.per_device_batch: Value 'abc'.*Integer"),
        ("train.per_device_batch=0", r"train.per_device_batch must be >= 1, got 0"),
        ("train.max_steps=-5", r"train.max_steps must be >= 1, got -5"),
        (
            "wandb.mode=cloud",
            r"wandb.mode: Invalid value 'cloud', expected one of \[online, offline, disabled\]",
        ),
        ("wandb.init_timeout=0", r"wandb.init_timeout must be > 0, got 0"),
        ("norm.override.neck=layernorm", r"norm.override.neck='layernorm' is not a norm kind"),
        ("norm.policy.min_batch=0", r"norm.policy.min_batch must be >= 1, got 0"),
        ("train.amp=fp8", r"train.amp: Invalid value 'fp8'"),
        ("model.arch=vgg16", r"model.arch: Invalid value 'vgg16'"),
        ("train.lr=0", r"train.lr must be a finite number > 0, got 0"),
        ("run.device=tpu", r"run.device: Invalid value 'tpu'"),
        ("dist.backend=mpi", r"dist.backend: Invalid value 'mpi'"),
        ("no_equals_sign", r"'no_equals_sign' is not of the form key=value"),
    ],
)
def test_bad_values_fail_with_dotted_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/shapes_det.yaml", [override])


def test_missing_required_value_and_missing_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"missing required config value\(s\): run.name"):
        load_config(empty)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key train.batchsize in .*bad.yaml"):
        load_config(bad)


def test_num_workers_auto_shares_the_cpus(monkeypatch):
    cfg = load_config(ROOT / "configs/shapes_det.yaml")
    assert cfg.data.num_workers == "auto"
    monkeypatch.setattr("trainer.schema.cpus_available", lambda: 16)  # taskset/cgroups count
    assert cfg.data.workers(1) == 8 and cfg.data.workers(4) == 4 and cfg.data.workers(32) == 1
    cfg = load_config(ROOT / "configs/shapes_det.yaml", ["data.num_workers=3"])
    assert cfg.data.workers(8) == 3
    for bad in ("-1", "many", "1.5"):
        # (OmegaConf refuses a float for the int-or-word field; the schema the rest)
        with pytest.raises(
            ConfigError, match="data.num_workers(: Value '1.5'| must be 'auto' or an integer)"
        ):
            load_config(ROOT / "configs/shapes_det.yaml", [f"data.num_workers={bad}"])


def test_batch_renorm_schedule_in_steps_or_fractions_of_the_run():
    cfg = load_config(
        ROOT / "configs/shapes_det.yaml",
        [
            "train.max_steps=1000",
            "train.grad_accum=2",
            "norm.brn.momentum=0.01",
            "norm.brn.hold_steps=0.125",
            "norm.brn.warmup_steps=0.8",
            "norm.brn.d_warmup_steps=500",
        ],
    )
    kw = cfg.norm.brn.layer_kwargs(cfg.train.max_steps * cfg.train.grad_accum)
    assert kw == dict(
        rmax=3.0, dmax=5.0, momentum=0.01, hold_steps=250, warmup_steps=1600, d_warmup_steps=500
    )
    for bad in ("norm.brn.warmup_steps=1.5", "norm.brn.hold_steps=-1", "norm.brn.momentum=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(ROOT / "configs/shapes_det.yaml", [bad])


def test_batch_renorm_settings_reach_the_layers():
    from norms import BatchRenorm2d
    from trainer.distributed import DistEnv
    from trainer.plan import plan_run
    from trainer.training import build_training

    cfg = load_config(
        ROOT / "configs/shapes_cls.yaml",
        [
            "train.per_device_batch=2",
            "norm.policy.small_batch=brn",
            "norm.brn.momentum=0.05",
            "norm.brn.hold_steps=0.5",
        ],
    )
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    t = build_training(cfg, env, plan_run(cfg, 1, "cpu", "gloo"))
    layers = [m for m in t.model.modules() if isinstance(m, BatchRenorm2d)]
    assert layers and all(m.momentum == 0.05 for m in layers)
    assert all(m.hold_steps == round(0.5 * cfg.train.max_steps) for m in layers)

"""The run configuration's schema: one dataclass per section, every field documented
where it is declared, and each section's own range checks (``__post_init__``), which
name the dotted key and the value.  The norm policy's section is ``norms.NormPolicy``.
``trainer.config`` loads YAML and overrides into it.

Closed sets of words are ``Word`` enums (trainer.choices): OmegaConf refuses any other word,
naming the key and the choices, and a member compares equal to its word.  A
number-or-word field is a union (``run.threads: int | str``), checked further in
``__post_init__``.  Two fields stay looser, each for a reason given where it is declared:
``data.min_size`` (an int or a list: OmegaConf has no union with a list) and the
tri-states ``train.cuda_graphs`` / ``norm.precise_bn.enabled`` (YAML turns their
true/false into booleans)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from norms.policy import NormPolicy
from trainer.archs import task_of
from trainer.choices import (
    Amp,
    Arch,
    Backend,
    BadBoxes,
    CheckImages,
    Dataset,
    Device,
    Optimizer,
    WandbMode,
)
from trainer.cpus import cpus_available
from trainer.sizing import Sizing

__all__ = ["BatchRenormConfig", "Config", "ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the value."""


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, options))}")


def _at_least(key: str, value: Any, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if value is None or value < low:
        raise ConfigError(f"{key} must be >= {low}{' or null' if allow_none else ''}, got {value}")


@dataclass
class RunConfig:
    name: str = MISSING  # required: every run has a name (its output folder)
    output_dir: str = "runs"
    seed: int = 0
    device: Device = Device.auto
    deterministic: bool = False
    # torch's intra-op threads per process: auto (OMP_NUM_THREADS when set, else this
    # process's share of the CPUs it may run on) | an int >= 1.  torch's default (every
    # core in every process) oversubscribes a machine running several training processes;
    # see docs/training.md, "CPU threads".
    threads: int | str = "auto"

    def __post_init__(self) -> None:
        if self.threads != "auto" and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ConfigError(
                f"run.threads must be 'auto' or an integer >= 1, got {self.threads!r}"
            )
        # The run folder is <output_dir>/<name>: a name that is a path could write outside
        # output_dir (run.name=.. put config.yaml into output_dir's parent).
        name = self.name
        if (
            not name
            or name in (".", "..")
            or any(sep in name for sep in ("/", "\\", "\0"))
            or Path(name).is_absolute()
        ):
            raise ConfigError(
                f"run.name must be a plain folder name (no '/', '\\', '..' or '.'), got {name!r}"
            )


@dataclass
class DataConfig:
    # shapes, scenes (generated on first use into a folder under root) | coco | imagefolder
    dataset: Dataset = Dataset.shapes
    root: str = "data/shapes"
    image_size: int = 96
    num_train: int = 2000  # shapes only: images generated per split
    num_val: int = 300
    num_workers: int | str = "auto"  # auto: min(8, CPUs per local process) | an int >= 0
    # COCO boxes that are empty or reach outside their image: drop (with one warning
    # naming them) | error
    bad_boxes: BadBoxes = BadBoxes.drop
    # Start-up check of every COCO image: header (size, chunk structure and a whole file:
    # PNG's IEND, JPEG's EOI) | full (decode every image).  Files unchanged since a
    # previous start are not opened again (a cache in ~/.cache/normpilot or
    # $NORMPILOT_CACHE_DIR); bench/results/image_check.md gives the costs
    check_images: CheckImages = CheckImages.header
    max_image_pixels: int = 89_478_485  # larger images are refused at start-up (PIL's limit)
    # Detection sizing (detectron2 / torchvision): the shorter side when training, an int
    # or a list (one drawn per image: multi-scale training), unless the longer side would
    # exceed max_size; test_size for eval and predict (null: the last min_size).  The
    # defaults are torchvision's (800, 1333); data.image_size is only the generated
    # shapes' size, and the shapes presets set min_size = max_size = ${data.image_size}.
    min_size: Any = 800  # int | list[int]: OmegaConf has no union with a list
    max_size: int = 1333
    test_size: int | None = None
    # Detection training augmentation (torchvision.transforms.v2): a horizontal flip
    # always; brightness/contrast/saturation jitter of this strength when > 0 (0.4:
    # torchvision's ColorJitter at +-40 %)
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        sizes = self.min_size if isinstance(self.min_size, list | tuple) else [self.min_size]
        if not sizes or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in sizes
        ):
            raise ConfigError(
                f"data.min_size must be an integer >= 16 or a non-empty list of them, "
                f"got {self.min_size!r}"
            )
        self.min_size = list(sizes) if len(sizes) > 1 else sizes[0]
        _at_least("data.max_size", self.max_size, max(sizes))
        _at_least("data.test_size", self.test_size, 16, allow_none=True)
        if not 0.0 <= self.color_jitter <= 1.0:  # also refuses nan
            raise ConfigError(f"data.color_jitter must be in [0, 1], got {self.color_jitter}")
        _at_least("data.max_image_pixels", self.max_image_pixels, 1)
        _at_least("data.image_size", self.image_size, 16)
        _at_least("data.num_train", self.num_train, 1)
        _at_least("data.num_val", self.num_val, 1)
        if self.num_workers != "auto" and (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, int)
            or self.num_workers < 0
        ):
            raise ConfigError(
                f"data.num_workers must be 'auto' or an integer >= 0, got {self.num_workers!r}"
            )

    def sizing(self) -> Sizing:
        sizes = tuple(self.min_size) if isinstance(self.min_size, list) else (self.min_size,)
        return Sizing(sizes, self.max_size, self.test_size or sizes[-1])

    def workers(self, local_world_size: int) -> int:
        """Loader processes per training process: ``auto`` shares this machine's CPUs
        among the local training processes, at most 8 each (a GPU step at 1-4 images
        is starved by 2 workers on a 16-core box; past 8, workers only add memory)."""
        if self.num_workers != "auto":
            return self.num_workers
        return max(1, min(8, cpus_available() // max(1, local_world_size)))


@dataclass
class ModelConfig:
    arch: Arch = Arch.fcos_resnet18_fpn
    num_classes: int = 3
    fpn_channels: int = 64
    backbone_weights: str | None = None  # local path to torchvision backbone weights
    # Detectors: the anchor size of each FPN level P3-P7 (FCOS also assigns objects to
    # levels by it); RetinaNet adds 2^(1/3) and 2^(2/3) of each.  null: torchvision's
    # defaults, FCOS 8-128 and RetinaNet 32-512; they do not scale with the input size.
    anchor_sizes: list[int] | None = None

    def __post_init__(self) -> None:
        if self.anchor_sizes is not None and (
            len(self.anchor_sizes) != 5 or any(v < 1 for v in self.anchor_sizes)
        ):
            raise ConfigError(
                f"model.anchor_sizes must be 5 positive sizes (P3-P7) or null, "
                f"got {list(self.anchor_sizes)}"
            )
        _at_least("model.num_classes", self.num_classes, 1)
        _at_least("model.fpn_channels", self.fpn_channels, 1)

    @property
    def task(self) -> str:
        return task_of(self.arch)


@dataclass
class TrainConfig:
    per_device_batch: int = 4  # samples in one forward pass of one process
    grad_accum: int = 1  # micro-batches per optimizer step (does not enlarge norm batches)
    max_steps: int = 500  # optimizer steps
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.01  # at ref_batch; scaled linearly with the global batch
    ref_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    clip_grad_norm: float | None = 10.0
    amp: Amp = Amp.none
    channels_last: bool = False
    compile: bool = False  # classifiers whole; detectors: backbone + FPN only
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no codegen)
    # auto | true | false: capture forward+backward (CUDA only).  A word, not an enum:
    # YAML and key=value turn true/false into booleans, which the field turns back.
    cuda_graphs: str = "auto"
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate at the end only

    def __post_init__(self) -> None:
        _at_least("train.per_device_batch", self.per_device_batch, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        _at_least("train.max_steps", self.max_steps, 1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        _at_least("train.ref_batch", self.ref_batch, 1)
        if not 0.0 <= self.momentum < 1.0:  # also refuses nan
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        _at_least("train.weight_decay", self.weight_decay, 0)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _at_least("train.clip_grad_norm", self.clip_grad_norm, 0, allow_none=True)
        # YAML and key=value turn true/false into booleans; the field keeps the words.
        self.cuda_graphs = str(self.cuda_graphs).lower()
        _one_of("train.cuda_graphs", self.cuda_graphs, ("auto", "true", "false"))
        _at_least("train.log_interval", self.log_interval, 1)
        _at_least("train.eval_interval", self.eval_interval, 0)


@dataclass
class CheckpointConfig:
    interval: int = 100  # optimizer steps between checkpoints (and one at the end)
    keep: int = 3  # newest checkpoints kept

    def __post_init__(self) -> None:
        _at_least("checkpoint.interval", self.interval, 1)
        _at_least("checkpoint.keep", self.keep, 1)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "normpilot"
    entity: str | None = None
    # Seconds wandb.init may take (online: reaching the server) before the run goes on
    # without wandb; metrics.jsonl is written either way.
    init_timeout: float = 90.0

    def __post_init__(self) -> None:
        if not (self.init_timeout > 0 and math.isfinite(self.init_timeout)):
            raise ConfigError(f"wandb.init_timeout must be > 0, got {self.init_timeout}")


@dataclass
class NormOverrideConfig:
    backbone: str | None = None  # null: let the policy decide
    neck: str | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        from norms import available_norms

        for part in ("backbone", "neck", "head"):
            kind = getattr(self, part)
            if kind is not None and kind not in available_norms():
                raise ConfigError(
                    f"norm.override.{part}={kind!r} is not a norm kind; valid kinds: "
                    f"{', '.join(available_norms())}"
                )


@dataclass
class BatchRenormConfig:
    rmax: float = 3.0
    dmax: float = 5.0
    # Weight of the new batch in the running statistics (PyTorch's convention; Keras's
    # renorm_momentum=0.99 is 0.01 here).  0.01 from the classification study: of the
    # three variants it measured (bench/results/study_cls.md), momentum 0.01 with a ramp
    # over the first quarter of the run had the best mean below min_batch (B = 8 and 4,
    # with or without precise BN) and over all batches; the library's layers keep
    # BatchNorm's 0.1 so they stay drop-in replacements.
    momentum: float = 0.01
    # The clip-limit schedule, in training forwards: an int, or a float in (0, 1] for a
    # fraction of the run (train.max_steps x train.grad_accum forwards).  Plain BN for
    # hold_steps, then rmax ramps to its value at warmup_steps and dmax at d_warmup_steps
    # (null: with rmax).  The paper's Inception-v3 run: hold 5k, dmax by 25k, rmax by 40k
    # (measured as the "paper's schedule" variant: hold 0.125, d 0.625, r 1.0).
    hold_steps: int | float = 0
    warmup_steps: int | float = 0.25
    d_warmup_steps: int | float | None = None

    def __post_init__(self) -> None:
        _at_least("norm.brn.rmax", self.rmax, 1.0)
        _at_least("norm.brn.dmax", self.dmax, 0.0)
        if not 0.0 < self.momentum <= 1.0:
            raise ConfigError(f"norm.brn.momentum must be in (0, 1], got {self.momentum}")
        for key in ("hold_steps", "warmup_steps", "d_warmup_steps"):
            value = getattr(self, key)
            if value is None and key == "d_warmup_steps":
                continue
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
                isinstance(value, float) and 0.0 < value <= 1.0
            )
            if not ok:
                raise ConfigError(
                    f"norm.brn.{key} must be an integer >= 0 (forwards) or a float in (0, 1] "
                    f"(a fraction of the run), got {value!r}"
                )

    def layer_kwargs(self, forwards: int) -> dict:
        """Batch Renorm constructor keywords for a run of ``forwards`` training forwards."""

        def steps(v):
            return v if v is None or isinstance(v, int) else round(v * forwards)

        return dict(
            rmax=self.rmax,
            dmax=self.dmax,
            momentum=self.momentum,
            hold_steps=steps(self.hold_steps),
            warmup_steps=steps(self.warmup_steps),
            d_warmup_steps=steps(self.d_warmup_steps),
        )


@dataclass
class PreciseBNConfig:
    # auto: on when a BatchNorm-family layer that learns running statistics trains at a
    # per-device batch below norm.policy.min_batch (its moving average is then noisy).
    enabled: str = "auto"  # auto | true | false (a word: see train.cuda_graphs)
    # Batches of train.per_device_batch per recalibration, before every eval and save.
    num_batches: int = 50

    def __post_init__(self) -> None:
        self.enabled = str(self.enabled).lower()  # YAML/CLI true/false arrive as booleans
        _one_of("norm.precise_bn.enabled", self.enabled, ("auto", "true", "false"))
        _at_least("norm.precise_bn.num_batches", self.num_batches, 1)


@dataclass
class NormConfig:
    policy: NormPolicy = field(default_factory=NormPolicy)  # norms/policy.py documents it
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    override: NormOverrideConfig = field(default_factory=NormOverrideConfig)
    brn: BatchRenormConfig = field(default_factory=BatchRenormConfig)


@dataclass
class DistConfig:
    backend: Backend = Backend.auto  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 600

    def __post_init__(self) -> None:
        _at_least("dist.timeout_s", self.timeout_s, 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        # A dataset holds one task's labels: catch the mismatch before any data is read.
        needs = {"scenes": "detection", "coco": "detection", "imagefolder": "classification"}
        task = needs.get(self.data.dataset)
        if task is not None and self.model.task != task:
            raise ConfigError(
                f"data.dataset={self.data.dataset!r} holds {task} data, but "
                f"model.arch={self.model.arch!r} is a {self.model.task} model"
            )

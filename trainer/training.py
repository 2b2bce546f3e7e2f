"""Everything a run trains with, built from the config: datasets, the train-loader
factory, and the ``Training`` bundle (model, DDP/compile wrapper, optimizer, schedule,
AMP).  The loop takes these and nothing else from the config's set-up."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from norms import NormChoice
from trainer.config import Config, ConfigError
from trainer.data import DataError, build_datasets, check_batch_fits, train_loader
from trainer.data.stream import LoaderFactory
from trainer.distributed import DistEnv, any_flag
from trainer.models import build_model
from trainer.optim import build_optimizer, build_scheduler, scaled_lr
from trainer.plan import RunPlan

__all__ = ["Training", "build_training", "load_datasets", "loader_factory", "model_from_config"]


@dataclass
class Training:
    model: nn.Module  # the bare model: its state is what a checkpoint holds
    net: nn.Module  # what runs a step: ``model`` under DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    task: str
    device: torch.device
    grad_accum: int  # micro-batches per optimizer step
    per_device_batch: int  # samples in one forward pass of one process
    global_batch: int  # samples per optimizer step, all ranks
    clip_grad_norm: float | None
    graphed: bool = False  # the static part replays from a CUDA graph (trainer.graphs)


def load_datasets(cfg: Config, env: DistEnv):
    """(train, val), checked against the model and the batch.  The shapes data is
    generated once per node, by local rank 0; the other ranks wait, then read it."""
    make = partial(
        build_datasets,
        cfg.data.dataset,
        cfg.data.root,
        cfg.model.task,
        image_size=cfg.data.image_size,
        num_train=cfg.data.num_train,
        num_val=cfg.data.num_val,
        seed=cfg.run.seed,
        bad_boxes=cfg.data.bad_boxes,
        check_images=cfg.data.check_images,
        max_image_pixels=cfg.data.max_image_pixels,
        color_jitter=cfg.data.color_jitter,
    )
    # Local rank 0 generates (and checks) first; the others read it after.  Each round
    # ends with every rank agreeing on failure, so one rank's bad data stops all of them
    # with its message, instead of the others dying later on a closed connection.
    datasets = None
    for builder in (True, False):
        error = None
        if (env.local_rank == 0) == builder:
            try:
                datasets = make(generate=builder)
            except DataError as e:
                error = e
        (failed,) = any_flag(env, error is not None)
        if failed:
            raise error or DataError("another rank could not load the data (see its error)")
    train_ds, val_ds = datasets
    if train_ds.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the training data has "
            f"{train_ds.num_classes} classes: set model.num_classes={train_ds.num_classes}"
        )
    check_batch_fits(len(train_ds), cfg.train.per_device_batch, env.world_size)
    return train_ds, val_ds


def loader_factory(cfg: Config, env: DistEnv, train_ds) -> LoaderFactory:
    """``(*, epoch, skip_batches) -> DataLoader`` over this rank's shard."""
    return partial(
        train_loader,
        train_ds,
        batch=cfg.train.per_device_batch,
        world_size=env.world_size,
        rank=env.rank,
        seed=cfg.run.seed,
        workers=cfg.data.workers(env.local_world_size),
        task=cfg.model.task,
        pin_memory=env.device.type == "cuda",
    )


def sync_groups(plan: dict[str, NormChoice], env: DistEnv) -> dict:
    """part -> this rank's process group for its synchronized layers, when the plan
    syncs in groups smaller than the world (consecutive ranks: torchrun numbers the
    ranks of a node consecutively, so a group that fits in a node stays inside it).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    sizes = sorted({c.sync_group_size for c in plan.values() if c.sync_group_size > 1})
    made = {}
    for size in sizes:
        if size < env.world_size:
            made[size], _ = dist.new_subgroups(group_size=size)
    return {part: made[c.sync_group_size] for part, c in plan.items() if c.sync_group_size in made}


def group_layout(plan: dict[str, NormChoice], env: DistEnv) -> dict | None:
    """Which ranks share statistics and on which node each rank runs (torchrun's
    GROUP_RANK), for policy.json; None when nothing syncs in groups.  A collective."""
    sizes = {c.sync_group_size for c in plan.values()} - {1, env.world_size}
    if not sizes:
        return None
    nodes = [None] * env.world_size
    dist.all_gather_object(nodes, int(os.environ.get("GROUP_RANK", "0")))
    size = max(sizes)
    ranks = list(range(env.world_size))
    return {
        "size": size,
        "groups": [ranks[i : i + size] for i in range(0, env.world_size, size)],
        "node_of_rank": nodes,
    }


RECOMPILE_LIMIT = 8


def compile_static_part(model: nn.Module, task: str, backend: str) -> None:
    """``torch.compile`` in place (state_dict keys unchanged) where shapes are static:
    the whole classifier, a detector's backbone + FPN only.  torchvision's detection
    transform, anchor matching and post-processing call ``.item()`` and grow lists, so
    dynamo would break the graph and recompile there on every batch, which looks like a
    hang.  Recompiles are capped at RECOMPILE_LIMIT, and reaching the cap is an error
    (``CompileError`` from the CLI) instead of a silent crawl."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    (model.backbone if task == "detection" else model).compile(backend=backend)


def model_from_config(cfg: Config, plan: dict[str, NormChoice], groups=None, weights=None):
    """The configured model with ``plan``'s norms (training and inference build it here)."""
    return build_model(
        cfg.model.arch,
        cfg.model.num_classes,
        plan,
        image_size=cfg.data.image_size,
        sizing=cfg.data.sizing(),
        anchor_sizes=cfg.model.anchor_sizes,
        fpn_channels=cfg.model.fpn_channels,
        backbone_weights=weights,
        brn=cfg.norm.brn.layer_kwargs(cfg.train.max_steps * cfg.train.grad_accum),
        groups=groups,
        gn_groups=cfg.norm.policy.gn_groups,
    )


def build_training(cfg: Config, env: DistEnv, plan: RunPlan) -> Training:
    parts, batch = plan.parts, plan.batch
    model = model_from_config(cfg, parts, sync_groups(parts, env), cfg.model.backbone_weights)
    if env.device.type == "cuda":
        # cuDNN picks the fastest kernels per shape, unless the run must be reproducible.
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
    model.to(env.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_static_part(model, cfg.model.task, cfg.train.compile_backend)
    net: nn.Module = model
    if env.world_size > 1:
        # broadcast_buffers=False: local BN keeps each rank's statistics (averaged before
        # eval and saving); synchronized layers agree by construction.
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers, but its replacement still syncs
            # buffers at init, which rank-local BN statistics must not do; until
            # init_sync_buffers exists this is the right flag, so its warning (one per
            # rank) is noise.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            net = DDP(
                model,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
    t = cfg.train
    lr = scaled_lr(t.lr, t.ref_batch, batch.global_)
    opt = build_optimizer(model, t.optimizer, lr, t.momentum, t.weight_decay)
    return Training(
        model=model,
        net=net,
        optimizer=opt,
        scheduler=build_scheduler(opt, t.warmup_steps, t.max_steps),
        scaler=torch.amp.GradScaler(env.device.type, enabled=t.amp == "fp16"),
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp),
        task=cfg.model.task,
        device=env.device,
        grad_accum=t.grad_accum,
        per_device_batch=batch.per_device,
        global_batch=batch.global_,
        clip_grad_norm=t.clip_grad_norm,
    )


def capture_static_part(t: Training, train_ds, canvases=()) -> str | None:
    """Capture CUDA graphs for ``t.model``'s static part, on a batch shaped like the
    run's: the image batch (classification) or the transform's padded batch (detection),
    built from the first training sample, or batches padded to each of a detector's
    ``canvases`` (trainer.canvas).  Returns why the capture failed (the model
    then trains eagerly), or None."""
    from trainer.graphs import capture

    batch = t.per_device_batch
    image = train_ds[0][0].to(t.device)
    if t.task == "detection":
        was = t.model.transform.training
        t.model.transform.train()
        sample = t.model.transform([image] * batch)[0].tensors
        t.model.transform.train(was)
    else:
        sample = image.expand(batch, *image.shape).contiguous()
    failed = capture(t.model, t.task, sample.detach().clone(), t.amp_dtype, canvases)
    t.graphed = failed is None
    return failed

"""The training run: config -> policy -> model with those norms -> DDP -> loop.

One code path for a laptop CPU, one GPU, and ``torchrun`` on one node or many.  Outputs
go to ``<run.output_dir>/<run.name>/``: config.yaml, policy.json, metrics.jsonl,
checkpoints/, wandb/.  Starting a run whose folder holds checkpoints resumes from the
newest readable one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from norms.batch_renorm import _RenormMixin
from trainer.checkpoint import list_checkpoints, load_latest, save_checkpoint, unwrap
from trainer.config import Config, ConfigError, to_dict, to_yaml
from trainer.data import DataError, build_datasets, eval_loader, train_loader
from trainer.distributed import DistEnv, any_flag, average_local_bn_stats
from trainer.evaluate import evaluate_classification, evaluate_detection
from trainer.logging import RunLogger
from trainer.models import build_model
from trainer.norm_plan import format_table, plan_norms, policy_record
from trainer.optim import build_optimizer, build_scheduler, scaled_lr

__all__ = ["train", "CheckpointError"]

BN_FAMILY = {"bn", "brn", "syncbn", "syncbrn", "frozenbn"}


class CheckpointError(ValueError):
    pass


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at a step boundary."""

    def __init__(self):
        self.set = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_blob() -> torch.Tensor:
    # Serialized to bytes: object collectives and weights_only loading both handle a
    # plain uint8 tensor, and each rank's state is kept whole.
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _restore_rng(blob: torch.Tensor) -> None:
    _set_rng_state(torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True))


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _check_resume(ckpt: dict, path: Path, cfg: Config, plan: dict) -> None:
    old_arch = ckpt.get("config", {}).get("model", {}).get("arch")
    if old_arch != cfg.model.arch:
        raise CheckpointError(
            f"checkpoint {path} is from model.arch={old_arch!r}, this run is "
            f"model.arch={cfg.model.arch!r}: use another run.name or remove the checkpoint"
        )
    for part, info in ckpt.get("policy", {}).get("parts", {}).items():
        if part not in plan:
            continue
        old, new = info["kind"], plan[part].kind
        if (old == "gn") != (new == "gn") and {old, new} - {"gn"} <= BN_FAMILY:
            raise CheckpointError(
                f"checkpoint {path} has {part} norm {old!r}, this run's policy picks {new!r}: "
                f"GroupNorm and BatchNorm-family layers do not share state.  Pin the part "
                f"with norm.override.{part}={old} to resume"
            )


def _brn_diagnostics(model: nn.Module) -> tuple[dict, dict]:
    """(means over Batch Renorm layers for metrics.jsonl, per-layer values for wandb)."""
    per_layer = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, _RenormMixin) and (s := m.renorm_stats()):
            for k in ("r_clipped", "d_clipped", "r_dev", "d_abs"):
                per_layer[f"brn/{name}/{k}"] = s[k]
    if not per_layer:
        return {}, {}
    means = {}
    for k in ("r_clipped", "d_clipped", "r_dev", "d_abs"):
        vals = [v for key, v in per_layer.items() if key.endswith("/" + k)]
        means[f"brn_{k}"] = sum(vals) / len(vals)
    return means, per_layer


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Progress:
    """tqdm on an interactive terminal, plain periodic lines otherwise (logs, CI)."""

    def __init__(self, enabled: bool, total: int, initial: int, every: int):
        self.bar = None
        self.enabled, self.every, self.total = enabled, every, total
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, ips: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {ips:.1f} img/s  lr {lr:.2e}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _evaluate(model, cfg: Config, val_ds, env: DistEnv) -> dict:
    loader = eval_loader(
        val_ds,
        batch=max(8, cfg.train.per_device_batch),
        world_size=env.world_size,
        rank=env.rank,
        workers=cfg.data.num_workers,
        task=cfg.model.task,
    )
    net = unwrap(model)
    was_training = net.training
    try:
        if cfg.model.task == "detection":
            return evaluate_detection(net, loader, val_ds, env.device, env.world_size)
        return evaluate_classification(net, loader, env.device, env.world_size)
    finally:
        net.train(was_training)


def train(cfg: Config, env: DistEnv) -> dict:
    """Train to ``train.max_steps`` (or until SIGTERM/SIGINT); returns the final metrics."""
    _seed(cfg.run.seed + env.rank, cfg.run.deterministic)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    # -- data (shapes generated once per node, by local rank 0) ---------------------------
    common = dict(
        image_size=cfg.data.image_size,
        num_train=cfg.data.num_train,
        num_val=cfg.data.num_val,
        seed=cfg.run.seed,
    )
    if env.local_rank == 0:
        train_ds, val_ds = build_datasets(
            cfg.data.dataset, cfg.data.root, cfg.model.task, generate=True, **common
        )
    env.barrier()
    if env.local_rank != 0:
        train_ds, val_ds = build_datasets(
            cfg.data.dataset, cfg.data.root, cfg.model.task, generate=False, **common
        )
    if train_ds.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the training data has "
            f"{train_ds.num_classes} classes"
        )
    steps_per_epoch = len(train_ds) // (cfg.train.per_device_batch * env.world_size)
    if steps_per_epoch == 0:
        raise DataError(
            f"train.per_device_batch={cfg.train.per_device_batch} x world_size "
            f"{env.world_size} is larger than the training set ({len(train_ds)} samples)"
        )

    # -- policy (re-derived on every start: a restart may have another world size) ---------
    plan = plan_norms(cfg, env.world_size, env.device.type, env.backend)
    record = policy_record(cfg, env.world_size, plan)
    if env.is_main:
        print(format_table(plan), flush=True)

    resumed = load_latest(ckpt_dir)
    if resumed is not None:
        _check_resume(resumed[0], resumed[1], cfg, plan)

    # -- model, DDP, optimizer ----------------------------------------------------------
    brn_kw = dict(
        rmax=cfg.norm.brn.rmax, dmax=cfg.norm.brn.dmax, warmup_steps=cfg.norm.brn.warmup_steps
    )
    model = build_model(
        cfg.model.arch,
        cfg.model.num_classes,
        plan,
        image_size=cfg.data.image_size,
        fpn_channels=cfg.model.fpn_channels,
        backbone_weights=cfg.model.backbone_weights,
        brn=brn_kw,
    )
    if resumed is not None:
        try:
            model.load_state_dict(resumed[0]["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {resumed[1]} does not fit this model: {str(e).splitlines()[0]}"
            ) from None
    model.to(env.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if env.world_size > 1:
        # broadcast_buffers=False: local BN keeps each rank's statistics (averaged before
        # eval and saving); synchronized layers agree by construction.
        net = DDP(
            model,
            device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    if cfg.train.compile:
        net = torch.compile(net)

    global_batch = cfg.train.per_device_batch * env.world_size * cfg.train.grad_accum
    lr = scaled_lr(
        cfg.train.lr,
        cfg.train.ref_batch,
        cfg.train.per_device_batch,
        env.world_size,
        cfg.train.grad_accum,
    )
    opt = build_optimizer(
        model, cfg.train.optimizer, lr, cfg.train.momentum, cfg.train.weight_decay
    )
    sched = build_scheduler(opt, cfg.train.warmup_steps, cfg.train.max_steps)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")

    step, epoch, pos = 0, 0, 0
    wandb_id = None
    if resumed is not None:
        ck, path = resumed
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch, pos, wandb_id = ck["step"], ck["epoch"], ck["batch_in_epoch"], ck["wandb_id"]
        if ck["world_size"] == env.world_size:
            _restore_rng(ck["rng"][env.rank])
        else:  # other shards: start the next epoch afresh, reseed per rank
            epoch, pos = epoch + (pos > 0), 0
            _seed(cfg.run.seed + env.rank + step, cfg.run.deterministic)
        if env.is_main:
            print(
                f"resumed from {path} at step {step} (world_size {ck['world_size']} -> "
                f"{env.world_size})",
                flush=True,
            )

    if env.is_main:
        _write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        _write_atomic(run_dir / "policy.json", json.dumps(record, indent=2) + "\n")
    logger = RunLogger(
        run_dir,
        enabled=env.is_main,
        wandb_mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        init_timeout=cfg.wandb.init_timeout,
        name=cfg.run.name,
        config=to_dict(cfg),
        run_id=wandb_id,
    )
    logger.log_table(
        "policy",
        ["part", "kind", "ws", "impl", "reason"],
        [[c.part, c.kind, c.ws, c.impl, c.reason] for c in plan.values()],
    )
    if resumed is not None:
        logger.log({"step": step, "event": "resume", "world_size": env.world_size})

    def checkpoint() -> Path | None:
        average_local_bn_stats(model, env)
        rngs = [_rng_blob()]
        if env.world_size > 1:
            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, _rng_blob().numpy().tobytes())
            rngs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in rngs]
        if not env.is_main:
            env.barrier()
            return None
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": pos,
            "rng": rngs,
            "config": to_dict(cfg),
            "policy": record,
            "wandb_id": logger.run_id,
            "world_size": env.world_size,
        }
        path = save_checkpoint(ckpt_dir, step, state, cfg.checkpoint.keep)
        env.barrier()
        return path

    micro = cfg.train.grad_accum
    progress = _Progress(env.is_main, cfg.train.max_steps, step, cfg.train.log_interval)
    loader_iter, stopped, final = None, False, {}
    last_saved = step if resumed is not None else -1
    try:
        with _StopFlag() as stop:
            net.train()
            while step < cfg.train.max_steps:
                t0 = time.perf_counter()
                position = (epoch, pos)  # where this step starts, if it is abandoned
                batches, error = [], None
                for _ in range(micro):
                    if loader_iter is None:
                        loader_iter = iter(
                            train_loader(
                                train_ds,
                                batch=cfg.train.per_device_batch,
                                world_size=env.world_size,
                                rank=env.rank,
                                seed=cfg.run.seed,
                                epoch=epoch,
                                skip_batches=pos,
                                workers=cfg.data.num_workers,
                                task=cfg.model.task,
                            )
                        )
                    try:
                        batches.append(next(loader_iter))
                        pos += 1
                    except StopIteration:
                        epoch, pos, loader_iter = epoch + 1, 0, None
                        batches.append(None)  # refetched below
                        loader_iter = iter(
                            train_loader(
                                train_ds,
                                batch=cfg.train.per_device_batch,
                                world_size=env.world_size,
                                rank=env.rank,
                                seed=cfg.run.seed,
                                epoch=epoch,
                                skip_batches=0,
                                workers=cfg.data.num_workers,
                                task=cfg.model.task,
                            )
                        )
                        batches[-1] = next(loader_iter)
                        pos += 1
                    except DataError as e:
                        error = e
                        break
                # One small all-reduce per step: a stop request or a data error anywhere
                # stops every rank at the same step, so nobody waits on a dead peer.
                stop_now, failed = any_flag(env, stop.set, error is not None)
                if failed:
                    raise (
                        error
                        if error is not None
                        else DataError("another rank failed to load its batch (see its log)")
                    )
                if stop_now:
                    # The batches fetched for this step are not trained: the checkpoint
                    # must point at them, not past them.
                    (epoch, pos), stopped = position, True
                    break
                loss_sum = 0.0
                for i, batch in enumerate(batches):
                    sync = contextlib.nullcontext()
                    if isinstance(net, DDP) and i < micro - 1:
                        sync = net.no_sync()  # all-reduce gradients once, on the last one
                    with (
                        sync,
                        torch.autocast(
                            env.device.type,
                            dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None,
                        ),
                    ):
                        if cfg.model.task == "detection":
                            images, targets = batch
                            images = [im.to(env.device, non_blocking=True) for im in images]
                            targets = [
                                {
                                    k: (v.to(env.device) if torch.is_tensor(v) else v)
                                    for k, v in t.items()
                                }
                                for t in targets
                            ]
                            loss = sum(net(images, targets).values())
                        else:
                            images, labels, _ = batch
                            logits = net(images.to(env.device, non_blocking=True))
                            loss = nn.functional.cross_entropy(logits, labels.to(env.device))
                        scaler.scale(loss / micro).backward()
                    loss_sum += loss.item() / micro
                if not np.isfinite(loss_sum):
                    raise FloatingPointError(f"loss is {loss_sum} at step {step}")
                if cfg.train.clip_grad_norm is not None:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                dt = time.perf_counter() - t0
                current_lr = opt.param_groups[0]["lr"]
                progress.update(step, loss_sum, global_batch / dt, current_lr)
                if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                    brn_means, brn_layers = _brn_diagnostics(model)
                    logger.log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_sum,
                            "lr": current_lr,
                            "images_per_s": global_batch / dt,
                            "peak_mem_mb": _peak_memory_mb(env.device),
                            **brn_means,
                        },
                        extra_wandb=brn_layers,
                    )
                if (
                    cfg.train.eval_interval
                    and step % cfg.train.eval_interval == 0
                    and step < cfg.train.max_steps
                ):
                    average_local_bn_stats(model, env)
                    logger.log({"step": step, "eval": _evaluate(net, cfg, val_ds, env)})
                if step % cfg.checkpoint.interval == 0 or step == cfg.train.max_steps:
                    checkpoint()
                    last_saved = step
        if stopped:
            if last_saved != step:
                checkpoint()
            logger.log({"step": step, "event": "preempted"})
            if env.is_main:
                print(
                    f"stop requested: checkpoint saved at step {step}; rerun the same "
                    f"command to resume",
                    flush=True,
                )
            return {"stopped_at": step}
        average_local_bn_stats(model, env)
        final = _evaluate(net, cfg, val_ds, env)
        logger.log({"step": step, "eval": final})
    finally:
        progress.close()
        logger.close()
    if env.is_main:
        ckpts = list_checkpoints(ckpt_dir)
        print(
            f"\nfinal eval: {json.dumps(final)}\noutputs in {run_dir}/ (config.yaml, "
            f"policy.json, metrics.jsonl, checkpoints/{ckpts[0].name if ckpts else ''})"
        )
        if logger.wandb_error:
            print(
                f"wandb was dropped during the run ({logger.wandb_error}); "
                "metrics.jsonl is complete"
            )
        elif cfg.wandb.mode == "offline":
            print(f"wandb (offline): upload with `wandb sync {run_dir}/wandb/offline-run-*`")
    return final

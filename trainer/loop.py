"""The training run: config -> policy -> model with those norms -> DDP -> loop.

One code path for a laptop CPU, one GPU, and ``torchrun`` on one node or many.  Outputs
go to ``<run.output_dir>/<run.name>/``: config.yaml, policy.json, metrics.jsonl,
checkpoints/, wandb/.  Starting a run whose folder holds checkpoints resumes from the
newest readable one.  ``train()`` reads as the table of contents; each job has its own
module: set-up (training.py), checkpoints and resume (checkpoint.py), data
(data/), evaluation (evaluate.py), logging (logging.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel as DDP

from norms import renorm_diagnostics
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    StopFlag,
    TrainState,
    list_checkpoints,
    seed_everything,
    write_atomic,
)
from trainer.config import Config, resolve_threads, to_dict, to_yaml
from trainer.data import DataError, describe
from trainer.data.stream import BatchStream, LoaderFactory
from trainer.distributed import DistEnv, any_flag, average_local_bn_stats
from trainer.evaluate import evaluate
from trainer.logging import Progress, RunLogger, peak_memory_mb, print_summary
from trainer.plan import RunPlan, plan_run
from trainer.recalibrate import Recalibrator
from trainer.training import (
    Training,
    build_training,
    capture_static_part,
    group_layout,
    load_datasets,
    loader_factory,
)

__all__ = ["train", "train_step", "CheckpointError"]


def train(
    cfg: Config, env: DistEnv, *, loader: LoaderFactory | None = None, plan: RunPlan | None = None
) -> dict:
    """Train to ``train.max_steps`` (or until SIGTERM/SIGINT); returns the final metrics.

    ``loader``: ``(*, epoch, skip_batches) -> batches``; default: the configured
    DataLoader over this rank's shard (benchmarks inject in-memory batches here).
    ``plan``: the CLI's pre-check plan, when it was made for this process group.
    """
    seed_everything(cfg.run.seed + env.rank, cfg.run.deterministic)
    threads, why = resolve_threads(
        cfg.run.threads, env.local_world_size, cfg.data.workers(env.local_world_size)
    )
    torch.set_num_threads(threads)  # before any model or data work
    if env.is_main:
        print(f"threads: {threads} per process ({why})", flush=True)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    train_ds, val_ds = load_datasets(cfg, env)
    # The plan is made on every start: a restart may have another world size.
    where = (env.world_size, env.local_world_size, env.device.type, env.backend)
    if plan is None or (plan.world_size, plan.local_world_size, plan.device, plan.backend) != where:
        plan = plan_run(cfg, env.world_size, env.device.type, env.backend, env.local_world_size)
    record = plan.record()
    if layout := group_layout(plan.parts, env):
        record["sync_groups"] = layout
    if env.is_main:
        print(plan.table(), flush=True)
    checkpoints = Checkpointer(
        run_dir / "checkpoints",
        env,
        interval=cfg.checkpoint.interval,
        keep=cfg.checkpoint.keep,
        meta={"config": to_dict(cfg), "policy": record, "dataset": describe(train_ds, cfg)},
    )
    found = checkpoints.latest(cfg.model.arch, plan.parts, cfg.train.optimizer)
    if found is not None and found[0]["step"] >= cfg.train.max_steps:
        # Nothing to train: re-running the command must not append an eval row, open a
        # wandb run or re-evaluate with training's statistics instead of the saved ones.
        if env.is_main:
            print(
                f"run {run_dir} already finished: {found[1].name} is at step "
                f"{found[0]['step']} (train.max_steps={cfg.train.max_steps}); nothing to do. "
                f"`normpilot eval --run {run_dir}` evaluates it; a larger train.max_steps "
                f"trains on",
                flush=True,
            )
        return {"finished_at": found[0]["step"]}

    t = build_training(cfg, env, plan)
    checkpoints.check_space(t.model, cfg.train.optimizer)
    if plan.graphs.enabled:
        capture_static_part(t, train_ds)
    stream = BatchStream(loader or loader_factory(cfg, env, train_ds))
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, stream)
    if found is not None:
        reseed = lambda step: seed_everything(  # noqa: E731
            cfg.run.seed + env.rank + step, cfg.run.deterministic
        )
        checkpoints.restore(state, found, reseed, batch=plan.batch.per_device)

    # A resume that fails before its first checkpoint leaves the folder describing the
    # checkpoints it holds: config.yaml, policy.json and metrics.jsonl are put back.
    undo = _FolderUndo(run_dir) if found is not None and env.is_main else None
    if env.is_main:
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        write_atomic(run_dir / "policy.json", json.dumps(record, indent=2) + "\n")
    logger = None
    try:
        logger = _open_logger(cfg, env, run_dir, state.wandb_id, plan)
        state.wandb_id = logger.run_id
        if found is not None:
            logger.log({"step": state.step, "event": "resume", "world_size": env.world_size})
        final = _Loop(cfg, env, t, state, checkpoints, logger, val_ds, plan).run()
    except BaseException:
        if undo is not None and checkpoints.last_saved == found[0]["step"]:
            if logger is not None:
                logger.close()
                logger = None
            undo.restore()
        raise
    finally:
        if logger is not None:
            logger.close()
    if env.is_main and "stopped_at" not in final and "finished_at" not in final:
        newest = next(iter(list_checkpoints(checkpoints.folder)), None)
        print_summary(final, run_dir, newest, logger, cfg.wandb.mode)
    return final


class _FolderUndo:
    """The run folder's config.yaml, policy.json and metrics.jsonl length, to put back."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.files = {
            name: (run_dir / name).read_bytes()
            for name in ("config.yaml", "policy.json")
            if (run_dir / name).is_file()
        }
        metrics = run_dir / "metrics.jsonl"
        self.metrics_size = metrics.stat().st_size if metrics.is_file() else 0

    def restore(self) -> None:
        for name, data in self.files.items():
            tmp = self.run_dir / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.run_dir / name)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            os.truncate(metrics, self.metrics_size)


class _Loop:
    """The step loop and its points: log, eval and checkpoint when due; then the final
    eval, or the preemption save when a stop was requested."""

    def __init__(self, cfg, env, t: Training, state, checkpoints, logger, val_ds, plan):
        self.cfg, self.env, self.t, self.state = cfg, env, t, state
        self.checkpoints, self.logger, self.val_ds = checkpoints, logger, val_ds
        self.eval_batch = plan.batch.eval
        self.recalibrate = Recalibrator(plan.precise, t, state.data, logger)
        self.meter = _LossMeter(state.step, cfg.train.clip_grad_norm)

    def run(self) -> dict:
        cfg, t, state = self.cfg, self.t, self.state
        progress = Progress(self.env.is_main, cfg.train.max_steps, state.step)
        try:
            with StopFlag() as stop:
                t.net.train()
                while state.step < cfg.train.max_steps:
                    batches = self._next_batches(stop)
                    if batches is None:
                        return self._preempted()
                    # A profiler marker (free when no profiler runs): tests check that
                    # no step between log points reads the device from the host.
                    with record_function(f"normpilot.step {state.step + 1}"):
                        self.meter.add(train_step(t, batches))
                        state.step += 1
                        self._after_step(progress)
                if stop.set:  # asked during the last step or its save: that save is done
                    return self._preempted()
                # The final checkpoint is saved: a stop now ends the eval at once.
                stop.raise_now = True
                try:
                    average_local_bn_stats(t.model, self.env)
                    final = self._evaluate()
                except KeyboardInterrupt:
                    return self._preempted(during="the final eval")
                stop.raise_now = False
            self.logger.log({"step": state.step, "eval": final})
            return final
        finally:
            progress.close()

    def _next_batches(self, stop: StopFlag) -> list | None:
        """This step's batches, or None when a stop was requested on any rank."""
        stream = self.state.data
        position = stream.position  # where this step starts, if it is abandoned
        batches, error = None, None
        try:
            batches = stream.take(self.t.grad_accum)
        except DataError as e:
            error = e
        # One small all-reduce per step: a stop request or a data error anywhere stops
        # every rank at the same step, so nobody waits on a dead peer.
        stop_now, failed = any_flag(self.env, stop.set, error is not None)
        if failed:
            raise error or DataError("another rank failed to load its batch (see its log)")
        if stop_now:
            # The batches fetched for this step are not trained: the checkpoint must
            # point at them, not past them.
            stream.rewind(position)
            return None
        return batches

    def _after_step(self, progress: Progress) -> None:
        """Between log points this reads nothing from the device (no host sync)."""
        cfg, t, step = self.cfg, self.t, self.state.step
        last = step == cfg.train.max_steps
        save = self.checkpoints.due(step, cfg.train.max_steps)
        progress.advance()
        if step % cfg.train.log_interval == 0 or last:
            loss, steps, seconds = self.meter.read(step)
            ips, lr = steps * t.global_batch / seconds, t.optimizer.param_groups[0]["lr"]
            progress.report(step, loss, ips, lr)
            means, per_layer = _brn_metrics(t.model)
            row = {"step": step, "epoch": self.state.data.epoch, "loss": loss, "lr": lr}
            row.update(images_per_s=ips, peak_mem_mb=peak_memory_mb(self.env.device), **means)
            self.logger.log(row, extra_wandb=per_layer)
        elif save:
            self.meter.check(step)  # never save weights a non-finite loss has touched
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and not last:
            with self.recalibrate.precise(step):
                average_local_bn_stats(t.model, self.env)
                self.logger.log({"step": step, "eval": self._evaluate()})
        if save:  # the last step's statistics stay for the final eval
            with self.recalibrate.precise(step, keep=last) as ema:
                self.checkpoints.save(self.state, bn_ema=ema)

    def _evaluate(self) -> dict:
        cfg = self.cfg
        metrics = evaluate(
            self.t.net,
            self.val_ds,
            self.env,
            task=self.t.task,
            batch=self.eval_batch,
            workers=cfg.data.workers(self.env.local_world_size),
        )
        if self.t.task == "detection" and self.logger.wandb_active:
            self._log_val_images()
        return metrics

    @torch.no_grad()
    def _log_val_images(self, n: int = 4) -> None:
        """Rank 0 (the only rank with a wandb run): the first val images, eval mode."""
        model = self.t.model
        images = [self.val_ds[i][0].to(self.t.device) for i in range(min(n, len(self.val_ds)))]
        was = model.training
        model.eval()
        try:
            outputs = model(images)
        finally:
            model.train(was)
        images = [im.cpu() for im in images]
        self.logger.log_detections(self.state.step, images, outputs, self.val_ds.categories)

    def _preempted(self, during: str | None = None) -> dict:
        step = self.state.step
        if self.checkpoints.last_saved != step:
            # The training state first, at once: precise BN (tens of batches) is not on
            # the preemption path.  The checkpoint holds training's moving averages; the
            # resumed run recalibrates at its next eval or save.
            if self.env.is_main:
                print(f"stop requested at step {step}: saving ...", flush=True)
            self.checkpoints.save(self.state, bn_ema=None)
        self.logger.log({"step": step, "event": "preempted"})
        if self.env.is_main:
            where = f" during {during}" if during else ""
            print(
                f"stop requested{where}: checkpoint saved at step {step}; rerun the same "
                f"command to resume"
                + (
                    f" (`normpilot eval --run {self.checkpoints.folder.parent}` evaluates it)"
                    if during
                    else ""
                ),
                flush=True,
            )
            if marker := os.environ.get("NORMPILOT_PREEMPT_FILE"):  # launch/preemptible.sh
                Path(marker).write_text(f"{self.state.step}\n")
        return {"stopped_at": self.state.step}


def train_step(t: Training, batches: list) -> torch.Tensor:
    """One optimizer step over ``batches`` (grad_accum micro-batches).  Returns the mean
    loss as a 0-dim device tensor: reading it is the caller's (host-syncing) choice."""
    loss_sum = None
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext()
        if isinstance(t.net, DDP) and i < len(batches) - 1:
            sync = t.net.no_sync()  # all-reduce gradients once, on the last one
        autocast = torch.autocast(
            t.device.type,
            dtype=t.amp_dtype or torch.float32,
            enabled=t.amp_dtype is not None,
            cache_enabled=not t.graphed,  # a captured graph must not hold the cast cache
        )
        with sync, autocast:
            loss = _loss(t, batch)
            t.scaler.scale(loss / t.grad_accum).backward()
        part = loss.detach().float() / t.grad_accum
        loss_sum = part if loss_sum is None else loss_sum + part
    if t.clip_grad_norm is not None:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), t.clip_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    return loss_sum


class TrainingDiverged(ValueError):
    """The loss went non-finite: a user-facing error (no traceback)."""


class _LossMeter:
    """Step losses summed on the device; read on the host only at log points."""

    def __init__(self, step: int, clip: float | None = None):
        self.clip = clip
        self._start(step)

    def _start(self, step: int) -> None:
        self.sum, self.first, self.t0 = None, step + 1, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.sum = loss if self.sum is None else self.sum + loss

    def check(self, step: int) -> None:
        if self.sum is not None and not torch.isfinite(self.sum):
            self._raise(step)

    def read(self, step: int) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last read; a host sync."""
        steps = step - self.first + 1
        loss = self.sum.item() / steps
        seconds = time.perf_counter() - self.t0
        if not math.isfinite(loss):
            self._raise(step)
        self._start(step)
        return loss, steps, seconds

    def _raise(self, step: int):
        advice = (
            "(train.clip_grad_norm is set); lower train.lr"
            if self.clip is not None
            else "lower train.lr or set train.clip_grad_norm"
        )
        raise TrainingDiverged(
            f"the loss is not finite in steps {self.first}-{step} "
            f"(loss sum {self.sum.item()}) {advice}. No checkpoint was written from these "
            f"steps"
        )


def _to(v, device: torch.device):
    return v.to(device, non_blocking=True) if torch.is_tensor(v) else v


def _loss(t: Training, batch) -> torch.Tensor:
    if t.task == "detection":
        images, targets = batch
        images = [im.to(t.device, non_blocking=True) for im in images]
        targets = [
            {
                k: (v.to(t.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in tgt.items()
            }
            for tgt in targets
        ]
        return sum(t.net(images, targets).values())
    images, labels, _ = batch
    logits = t.net(images.to(t.device, non_blocking=True))
    return nn.functional.cross_entropy(logits, labels.to(t.device, non_blocking=True))


_BRN_KEYS = ("r_clipped", "d_clipped", "r_dev", "d_abs")


def _brn_metrics(model: nn.Module) -> tuple[dict, dict]:
    """(means over Batch Renorm layers for metrics.jsonl, per-layer values for wandb)."""
    layers = renorm_diagnostics(model)
    if not layers:
        return {}, {}
    means = {f"brn_{k}": sum(s[k] for s in layers.values()) / len(layers) for k in _BRN_KEYS}
    per_layer = {f"brn/{name}/{k}": s[k] for name, s in layers.items() for k in _BRN_KEYS}
    return means, per_layer


def _open_logger(cfg: Config, env: DistEnv, run_dir: Path, run_id, plan) -> RunLogger:
    logger = RunLogger(
        run_dir,
        enabled=env.is_main,
        wandb_mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        init_timeout=cfg.wandb.init_timeout,
        name=cfg.run.name,
        config=to_dict(cfg),
        run_id=run_id,
    )
    logger.log_table(
        "policy",
        ["part", "kind", "ws", "impl", "reason"],
        [[c.part, c.kind, c.ws, c.impl, plan.reason(part)] for part, c in plan.parts.items()],
    )
    return logger

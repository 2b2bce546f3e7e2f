"""The training run: config -> run plan -> model with those norms -> DDP -> loop.

One code path for a laptop CPU, one GPU, and ``torchrun`` on one node or many.  Outputs
go to ``<run.output_dir>/<run.name>/``: config.yaml, policy.json, metrics.jsonl,
checkpoints/, wandb/.  Starting a run whose folder holds checkpoints resumes from the
newest readable one.  ``train()`` reads as the table of contents; each job has its own
module: the plan (plan.py), set-up (training.py), one optimizer step (step.py),
checkpoints and resume (checkpoint.py), data (data/), evaluation (evaluate.py), the run
log (tracking.py).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function

from norms import renorm_diagnostics
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    StopFlag,
    TrainState,
    list_checkpoints,
)
from trainer.config import Config, to_dict, to_yaml
from trainer.cpus import resolve_threads
from trainer.data import DataError, describe
from trainer.data.stream import BatchStream, LoaderFactory
from trainer.distributed import DistEnv, any_flag, average_local_bn_stats
from trainer.evaluate import evaluate
from trainer.files import write_atomic
from trainer.plan import RunPlan, plan_run
from trainer.recalibrate import Recalibrator
from trainer.rng import seed_everything
from trainer.step import LossMeter, TrainingDiverged, train_step
from trainer.tracking import Progress, RunLogger, peak_memory_mb, print_summary
from trainer.training import (
    Training,
    build_training,
    capture_static_part,
    group_layout,
    load_datasets,
    loader_factory,
)

__all__ = ["train", "train_step", "CheckpointError", "TrainingDiverged"]


def train(
    cfg: Config, env: DistEnv, *, loader: LoaderFactory | None = None, plan: RunPlan | None = None
) -> dict:
    """Train to ``train.max_steps`` (or until SIGTERM/SIGINT); returns the final metrics.

    ``loader``: ``(*, epoch, skip_batches) -> batches``; default: the configured
    DataLoader over this rank's shard (benchmarks inject in-memory batches here).
    ``plan``: the CLI's pre-check plan, when it was made for this process group.
    """
    seed_everything(cfg.run.seed + env.rank, cfg.run.deterministic)
    _set_threads(cfg, env)  # before any model or data work
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    train_ds, val_ds = load_datasets(cfg, env)
    plan = _plan_for(cfg, env, plan)
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
        return _already_finished(cfg, env, run_dir, found)

    t = build_training(cfg, env, plan)
    checkpoints.check_space(t.model, cfg.train.optimizer)
    if plan.graphs.enabled and (failed := capture_static_part(t, train_ds, plan.graphs.canvases)):
        # a run that would have worked eagerly keeps training, and says so
        record["cuda_graphs"] = {"enabled": False, "reason": f"eager (capture failed: {failed})"}
        if env.is_main:
            warnings.warn(f"CUDA graphs: eager (capture failed: {failed})", stacklevel=1)
    stream = BatchStream(loader or loader_factory(cfg, env, train_ds))
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, stream)
    if found is not None:
        reseed = lambda step: seed_everything(  # noqa: E731
            cfg.run.seed + env.rank + step, cfg.run.deterministic
        )
        checkpoints.restore(state, found, reseed, batch=plan.batch.per_device)
    loop = _Loop(cfg, env, t, state, checkpoints, val_ds, plan)
    final, logger = _run(cfg, env, run_dir, record, loop)
    if env.is_main and "stopped_at" not in final and "finished_at" not in final:
        newest = next(iter(list_checkpoints(checkpoints.folder)), None)
        print_summary(final, run_dir, newest, logger, cfg.wandb.mode)
    return final


def _set_threads(cfg: Config, env: DistEnv) -> None:
    threads, why = resolve_threads(
        cfg.run.threads, env.local_world_size, cfg.data.workers(env.local_world_size)
    )
    torch.set_num_threads(threads)
    if env.is_main:
        print(f"threads: {threads} per process ({why})", flush=True)


def _plan_for(cfg: Config, env: DistEnv, plan: RunPlan | None) -> RunPlan:
    """The pre-check's plan when it was made for this process group; otherwise made here
    (a restart may have another world size: the plan is made on every start)."""
    where = (env.world_size, env.local_world_size, env.device.type, env.backend)
    if plan is None or (plan.world_size, plan.local_world_size, plan.device, plan.backend) != where:
        plan = plan_run(cfg, env.world_size, env.device.type, env.backend, env.local_world_size)
    return plan


def _already_finished(cfg: Config, env: DistEnv, run_dir: Path, found) -> dict:
    # Nothing to train: re-running the command must not append an eval row, open a wandb
    # run or re-evaluate with training's statistics instead of the saved ones.
    if env.is_main:
        print(
            f"run {run_dir} already finished: {found[1].name} is at step "
            f"{found[0]['step']} (train.max_steps={cfg.train.max_steps}); nothing to do. "
            f"`normpilot eval --run {run_dir}` evaluates it; a larger train.max_steps "
            f"trains on",
            flush=True,
        )
    return {"finished_at": found[0]["step"]}


def _run(cfg: Config, env: DistEnv, run_dir: Path, record: dict, loop: _Loop):
    """Write the run's description, open the logger and run the loop.  A resume that
    fails before its first checkpoint leaves the folder describing the checkpoints it
    holds: config.yaml, policy.json and metrics.jsonl are put back."""
    state, checkpoints = loop.state, loop.checkpoints
    resumed_at = checkpoints.last_saved if checkpoints.last_saved >= 0 else None
    undo = _FolderUndo(run_dir) if resumed_at is not None and env.is_main else None
    if env.is_main:
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        write_atomic(run_dir / "policy.json", json.dumps(record, indent=2) + "\n")
    logger = None
    try:
        logger = _open_logger(cfg, env, run_dir, state.wandb_id, loop.plan)
        loop.attach(logger)
        state.wandb_id = logger.run_id
        if resumed_at is not None:
            logger.log({"step": state.step, "event": "resume", "world_size": env.world_size})
        final = loop.run()
    except BaseException:
        if undo is not None and checkpoints.last_saved == resumed_at:
            if logger is not None:
                logger.close()
                logger = None
            undo.restore()
        raise
    finally:
        if logger is not None:
            logger.close()
    return final, logger


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
            write_atomic(self.run_dir / name, data)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            os.truncate(metrics, self.metrics_size)


class _Loop:
    """The step loop and its points: log, eval and checkpoint when due; then the final
    eval, or the preemption save when a stop was requested."""

    def __init__(self, cfg, env, t: Training, state, checkpoints, val_ds, plan: RunPlan):
        self.cfg, self.env, self.t, self.state = cfg, env, t, state
        self.checkpoints, self.val_ds, self.plan = checkpoints, val_ds, plan
        self.logger: RunLogger | None = None  # attach() before run()
        self.meter = LossMeter(state.step, cfg.train.clip_grad_norm)

    def attach(self, logger: RunLogger) -> None:
        self.logger = logger
        self.recalibrate = Recalibrator(self.plan.precise, self.t, self.state.data, logger)

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
            self.logger.log({"step": state.step, "eval": final, **self._graph_counts()})
            return final
        finally:
            progress.close()

    def _graph_counts(self) -> dict:
        """Training forwards replayed from the CUDA graph and run eagerly so far (a
        graphed run only; they also reach wandb's summary as the last values logged)."""
        counts = getattr(self.t.model, "graph_counts", None)
        return counts.as_dict() if self.t.graphed and counts is not None else {}

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
            self.logger.log({**row, **self._graph_counts()}, extra_wandb=per_layer)
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
            batch=self.plan.batch.eval,
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

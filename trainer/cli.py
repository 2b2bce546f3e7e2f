"""``normpilot <command>`` (= ``python -m trainer <command>``): the service's command line.

    normpilot train   --config C [key=value ...]               (also under torchrun)
    normpilot policy  --config C [--world-size W] [--device cpu|cuda] [key=value ...]
    normpilot eval    --run R [--checkpoint P] [key=value ...]  (also under torchrun)
    normpilot predict --run R IMAGES... [--score-thresh T] [--top-k K] [--ann F] [--out D]
    normpilot export  --run R [--out D]
    normpilot runs    [--root runs]

``policy`` prints the per-part norm decisions for any world size without building a
model or starting workers, so a 64-GPU run can be planned on a laptop.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from trainer.config import ConfigError, load_config

__all__ = ["main"]


def _policy(args: argparse.Namespace) -> int:
    import json

    import torch

    from norms import resolve_device
    from trainer.plan import plan_run

    cfg = load_config(args.config, args.overrides)
    if args.device:
        cfg.run.device = args.device
    device, backend = resolve_device(
        cfg.run.device, cfg.dist.backend, cuda_available=torch.cuda.is_available()
    )
    world = args.world_size
    local = args.nproc_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world
    plan = plan_run(cfg, world, device, backend, local)
    if args.json:  # exactly what a run with this world size writes as policy.json
        print(json.dumps(plan.record(), indent=2))
        return 0
    accum = cfg.train.grad_accum
    print(
        f"norm policy for {args.config} ({cfg.model.arch}): world_size {world} "
        f"({local} per node), per_device_batch {cfg.train.per_device_batch}"
        + (f", grad_accum {accum} (does not enlarge a norm's batch)" if accum > 1 else "")
        + f", {device}/{backend}\n"
    )
    print(plan.table())
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.checkpoint import list_checkpoints
    from trainer.distributed import init_distributed, teardown
    from trainer.loop import train

    # Everything that can be checked without workers is checked before any group forms.
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    new_folder = not run_dir.exists()
    try:
        plan = _check_before_workers(cfg)
        env = init_distributed(cfg.run.device, cfg.dist.backend, cfg.dist.timeout_s)
    except BaseException:
        _remove_if_empty(run_dir, new_folder)
        raise
    try:
        train(cfg, env, plan=plan)
    except KeyboardInterrupt:
        # A second Ctrl-C (during a save, or anywhere): stop now, without a traceback.
        newest = next(iter(list_checkpoints(run_dir / "checkpoints")), None)
        print(
            f"interrupted: stopped at once; the run resumes from "
            f"{newest or 'the start (no checkpoint yet)'} (metrics.jsonl rows after that "
            f"step are redone)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        _remove_if_empty(run_dir, new_folder)
        if type(e).__name__ != "FailOnRecompileLimitHit":
            raise
        from trainer.training import RECOMPILE_LIMIT

        raise ConfigError(
            f"train.compile=true: torch.compile recompiled more than {RECOMPILE_LIMIT} times "
            f"(input shapes or Python state keep changing; {str(e).splitlines()[0]}). "
            f"Train with train.compile=false"
        ) from None
    finally:
        teardown()
    return 0


def _remove_if_empty(run_dir: Path, new_folder: bool) -> None:
    """A start that failed before writing anything leaves no run folder behind (only
    folders this start made, and only while they hold no file)."""
    if not new_folder or not run_dir.is_dir():
        return
    if any(p.is_file() for p in run_dir.rglob("*")):
        return
    for p in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        p.rmdir()
    run_dir.rmdir()


def _check_before_workers(cfg):
    """The run plan (it raises if the run is impossible) and a writable run folder,
    before any process group forms; ``train()`` runs on this plan."""
    import torch

    from norms import resolve_device
    from trainer.plan import plan_run

    device, backend = resolve_device(
        cfg.run.device, cfg.dist.backend, cuda_available=torch.cuda.is_available()
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world
    plan = plan_run(cfg, world, device, backend, local)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    try:  # the run folder must be writable before anything is built or started
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir!r}: cannot write the run folder {run_dir} "
            f"({e.strerror or e})"
        ) from None
    t = cfg.train
    if t.max_steps < t.warmup_steps and os.environ.get("RANK", "0") == "0":
        print(
            f"warning: train.max_steps={t.max_steps} < train.warmup_steps={t.warmup_steps}: "
            f"the learning rate never reaches train.lr",
            file=sys.stderr,
        )
    return plan


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normpilot", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("policy", help="print the norm decision for each model part")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/shapes_det.yaml")
    p.add_argument(
        "--world-size",
        type=_positive_int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="number of processes to plan for (default: $WORLD_SIZE or 1)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        help="processes per node, for sync groups (default: $LOCAL_WORLD_SIZE, else the "
        "world size)",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="plan for this device (default: run.device)"
    )
    p.add_argument("--json", action="store_true", help="print the policy.json record only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_policy)

    t = sub.add_parser("train", help="train (resumes from the run folder's newest checkpoint)")
    t.add_argument("--config", required=True, help="YAML preset, e.g. configs/shapes_det.yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=_train)
    _after_training(sub)
    return parser


def _after_training(sub) -> None:
    from trainer import commands

    def run_args(p, overrides=False):
        # --run-dir: the same; under torchrun write that one, since torchrun reads
        # "--run" as an abbreviation of its own --run-path.
        p.add_argument(
            "--run", "--run-dir", dest="run", required=True, help="a run folder (runs/NAME)"
        )
        p.add_argument("--checkpoint", help="a checkpoint file (default: newest valid)")
        if overrides:
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    e = sub.add_parser("eval", help="evaluate a checkpoint; writes <run>/eval.json")
    run_args(e, overrides=True)
    e.set_defaults(func=commands.cmd_eval)
    p = sub.add_parser("predict", help="detections / top-k for images, files or globs")
    run_args(p)
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", help="output folder (default: <run>/predictions)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="detection: keep >= this")
    p.add_argument("--top-k", type=_positive_int, default=3, help="classification: classes kept")
    p.add_argument(
        "--ann",
        help="COCO annotation file whose image ids predictions.json uses (default: the "
        "dataset's own when the images are in the COCO layout, else the argument order)",
    )
    p.set_defaults(func=commands.cmd_predict)
    x = sub.add_parser("export", help="TorchScript + weights-only model, torch/torchvision only")
    run_args(x)
    x.add_argument("--out", help="output folder (default: <run>/export)")
    x.set_defaults(func=commands.cmd_export)
    r = sub.add_parser("runs", help="list run folders: step, checkpoint, last eval, norms")
    r.add_argument("--root", default="runs", help="folder holding run folders (default: runs)")
    r.set_defaults(func=commands.cmd_runs)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Our own warnings are messages for the user: one line, without the source position.
    where = Path(filename).resolve()
    if category is UserWarning and any(where.is_relative_to(p) for p in _OURS):
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_OURS = [Path(__file__).resolve().parents[1] / name for name in ("trainer", "norms")]
_default_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # policy, data and checkpoint checks: user errors, no traceback
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # When one rank dies, every other rank's next collective fails with a transport
        # error ("Connection closed by peer", ...).  Those ranks say so in one line; the
        # rank that failed first printed the real cause (its traceback).
        if os.environ.get("RANK") is None or not _peer_gone(e):
            raise
        print(
            f"error (rank {os.environ['RANK']}): stopped because another rank failed "
            f"(see the first error above)",
            file=sys.stderr,
        )
        return 1


_PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "socket closed",
    "nccl communicator was aborted",
)


def _peer_gone(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return "distbackenderror" in text or any(s in text for s in _PEER_GONE)

"""What the training service costs: trainer vs a hand-written loop, the data pipeline,
and DDP over gloo on the CPU.

    python -m bench.speed [--quick] [--repeats 5] [--device cpu|cuda] [--out bench/results]

``--device cuda`` runs the trainer and the hand loop on the GPU (``speed_cuda.*``; the
CPU-only DDP-over-gloo section is skipped there).

* ``trainer_overhead``: ``trainer.loop.train`` against a minimal PyTorch loop (same model
  from ``build_model``, same in-memory batches, same optimizer and schedule), on the
  ``shapes_cls`` preset.  The trainer is run end to end at two step counts and its
  per-step time is the difference over the extra steps, so set-up, the final checkpoint
  and the final evaluation cancel out; logging, progress, the per-step stop-flag check
  and periodic BRN diagnostics stay in.  Runs are interleaved; ratio of medians.
* ``data_pipeline``: the default detection preset's loader alone (its own workers) in
  images/s vs the model's consumption (a training step on in-memory batches), and the
  trainer's step time with the real loader at 0, 1 and the preset's workers vs in-memory
  batches (1.0 = loading costs the step nothing; on 2 cores, workers share the cores with
  the training threads, so a loader far faster than the model can still cost a little).
* ``ddp_cpu``: a ResNet-18 classifier step at a per-device batch, 1 process vs 2 gloo
  processes over 127.0.0.1 (one thread each, so each process does the same work), for
  bn, syncbn and syncbrn: what DDP's gradient all-reduce and the norm synchronization
  cost on this machine.

Writes ``speed.json`` and ``speed.md`` (or ``speed_quick.*``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from bench.common import machine, sync_device
from norms import convert_norms
from trainer.config import load_config
from trainer.distributed import DistEnv, spawn_gloo
from trainer.loop import train
from trainer.plan import plan_run
from trainer.training import build_training, load_datasets, loader_factory

ROOT = Path(__file__).resolve().parents[1]

CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
# Where the trainer and hand-loop steps run (--device); loading is always on the CPU.
RUN = CPU
# Trainer runs measure training steps: no wandb, no periodic checkpoint or evaluation,
# no precise BN (it runs before an eval or a save, so only at the end here: the same in
# the short and the long run, it cancels in their difference and only costs wall time).
QUIET = [
    "wandb.mode=disabled",
    "checkpoint.interval=100000",
    "train.eval_interval=0",
    "norm.precise_bn.enabled=false",
]


def _config(preset: str, overrides: list[str]):
    return load_config(ROOT / "configs" / preset, [f"run.device={RUN.device.type}", *overrides])


def _batches(cfg, ds, n: int) -> list:
    """``n`` real batches from the trainer's loader, kept in memory."""
    return list(itertools.islice(loader_factory(cfg, CPU, ds)(epoch=0, skip_batches=0), n))


class _InMemory:
    """A loader factory for ``train(loader=...)``: the same few batches, every epoch."""

    def __init__(self, batches: list, per_epoch: int):
        self.batches, self.per_epoch = batches, per_epoch

    def __call__(self, *, epoch: int, skip_batches: int):
        return (self.batches[i % len(self.batches)] for i in range(skip_batches, self.per_epoch))


def _trainer_seconds(preset: str, overrides: list[str], steps: int, in_memory: _InMemory | None):
    """Wall time of ``trainer.loop.train`` for ``steps`` steps in a fresh run folder."""
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = _config(preset, [*overrides, f"run.output_dir={tmp}", f"train.max_steps={steps}"])
        t0 = time.perf_counter()
        train(run_cfg, RUN, loader=in_memory)
        sync_device(RUN.device)
        return time.perf_counter() - t0


def _hand_loop_seconds(preset, overrides, batches: list, steps: int, warmup: int = 3) -> float:
    """The minimal loop: the trainer's model, optimizer and schedule (built by the same
    ``build_training``) on the same batches; no service around the step."""
    cfg = _config(preset, [*overrides, f"train.max_steps={steps + warmup}"])
    torch.manual_seed(cfg.run.seed)
    t = build_training(cfg, RUN, plan_run(cfg, 1, RUN.device.type, RUN.backend))
    model, opt, sched, dev = t.model, t.optimizer, t.scheduler, RUN.device
    model.train()

    def step(batch):  # batches are copied to the device each step, as the trainer does
        if cfg.model.task == "detection":
            images, targets = batch
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [
                {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in g.items()}
                for g in targets
            ]
            loss = sum(model(images, targets).values())
        else:
            images, labels, _ = batch
            logits = model(images.to(dev, non_blocking=True))
            loss = nn.functional.cross_entropy(logits, labels.to(dev, non_blocking=True))
        loss.backward()
        if cfg.train.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    sync_device(RUN.device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync_device(RUN.device)
    return time.perf_counter() - t0


def _step_seconds(preset: str, overrides: list[str], short: int, long: int, source) -> float:
    """The trainer's time per step: runs of ``long`` and ``short`` steps, differenced, so
    start-up (model build, first eval, checkpoint) cancels.  On a busy machine the
    difference of two timings can come out <= 0 when few steps separate them; such a
    measurement is impossible, so it is taken again (3 tries) rather than reported."""
    for _ in range(3):
        t_short = _trainer_seconds(preset, overrides, short, source)
        t_long = _trainer_seconds(preset, overrides, long, source)
        if t_long > t_short:
            return (t_long - t_short) / (long - short)
    raise RuntimeError(
        f"{preset}: {long} steps timed no slower than {short} in 3 tries: timing noise "
        "exceeds the steps' time; run on an idle machine or with more steps"
    )


# -- trainer overhead --------------------------------------------------------------------
def trainer_overhead(repeats: int, short: int, long: int, data: list[str]) -> dict:
    preset = "shapes_cls.yaml"
    overrides = [*data, *QUIET, "data.num_val=64", "data.num_workers=0"]
    cfg = _config(preset, overrides)
    train_ds, _ = load_datasets(cfg, CPU)
    batches = _batches(cfg, train_ds, 8)
    in_memory = _InMemory(batches, len(train_ds) // cfg.train.per_device_batch)
    trainer_step, hand_step = [], []
    for _ in range(repeats):
        trainer_step.append(_step_seconds(preset, overrides, short, long, in_memory))
        hand = _hand_loop_seconds(preset, overrides, batches, long - short)
        hand_step.append(hand / (long - short))
    t, h = statistics.median(trainer_step), statistics.median(hand_step)
    # Each repeat's trainer and hand runs are back to back: their ratio shows the noise.
    per_repeat = [a / b for a, b in zip(trainer_step, hand_step, strict=True)]
    return {
        "what": f"ResNet-18 classifier, batch {cfg.train.per_device_batch}, "
        f"{cfg.data.image_size} px, SGD; trainer step from runs of {short} and {long} steps",
        "trainer_step_s": t,
        "hand_loop_step_s": h,
        "ratio": t / h,
        "ratio_range": [min(per_repeat), max(per_repeat)],
        "target": 1.05,
        "samples": {"trainer": trainer_step, "hand": hand_step},
    }


# -- data pipeline -------------------------------------------------------------------------
def data_pipeline(repeats: int, short: int, long: int, data: list[str]) -> dict:
    preset = "shapes_det.yaml"
    base = [*data, *QUIET, "data.num_val=16"]
    cfg = _config(preset, base)
    train_ds, _ = load_datasets(cfg, CPU)
    batch, workers = cfg.train.per_device_batch, cfg.data.workers(1)
    # The loader alone, with the preset's workers, over `long` batches.
    loader_ips = []
    for _ in range(repeats):
        it = iter(loader_factory(cfg, CPU, train_ds)(epoch=0, skip_batches=0))
        next(it)  # workers started
        t0 = time.perf_counter()
        for _ in range(long):
            next(it)
        loader_ips.append(long * batch / (time.perf_counter() - t0))
        del it
    batches = _batches(cfg, train_ds, 8)
    model_ips = [
        long * batch / _hand_loop_seconds(preset, base, batches, long) for _ in range(repeats)
    ]
    in_memory = _InMemory(batches, len(train_ds) // batch)
    # The trainer with the real loader at 0 workers (loading in the training process), 1,
    # and the preset's count: loader workers share the cores with the training threads.
    counts = sorted({0, 1, workers})
    real: dict[int, list[float]] = {w: [] for w in counts}
    mem: list[float] = []
    for _ in range(repeats):
        runs = [(mem, base, in_memory)]
        runs += [(real[w], [*base, f"data.num_workers={w}"], None) for w in counts]
        for sink, overrides, source in runs:
            sink.append(_step_seconds(preset, overrides, short, long, source))
    loader, model = statistics.median(loader_ips), statistics.median(model_ips)
    step_mem = statistics.median(mem)
    return {
        "what": f"FCOS ResNet-18 detection preset, batch {batch}, {cfg.data.image_size} px, "
        f"{workers} loader workers",
        "loader_images_per_s": loader,
        "model_images_per_s": model,
        "loader_over_model": loader / model,
        "trainer_step_in_memory_s": step_mem,
        "by_workers": {
            str(w): {
                "trainer_step_s": statistics.median(real[w]),
                "over_in_memory": statistics.median(real[w]) / step_mem,
            }
            for w in counts
        },
    }


# -- DDP on the CPU ------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, kinds: list, batch: int, size: int, steps: int, out: str):
    """Each kind in turn in one process group: a fresh model, ``steps`` timed steps after
    3 warm-up steps.  One spawn for all kinds, as starting the processes (importing torch)
    costs more than the steps themselves."""
    torch.set_num_threads(1)
    from torchvision.models import resnet18

    got = {}
    for kind in kinds:
        torch.manual_seed(0)
        extra = {"warmup_steps": 0} if kind == "syncbrn" else {}
        model = convert_norms(resnet18(num_classes=3), kind, **extra)
        # World size 1 runs the plain model (sync layers take their no-collective path).
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 3, (batch,))
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        got[kind] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(got))


def ddp_cpu(repeats: int, steps: int, batch: int = 8, size: int = 64) -> dict:
    kinds = ["bn", "syncbn", "syncbrn"]
    results: dict[str, dict[str, list[float]]] = {k: {"1": [], "2": []} for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "t.json")
        for _ in range(repeats):
            for world in (1, 2):
                spawn_gloo(_ddp_worker, world, kinds, batch, size, steps, out, timeout=None)
                for kind, seconds in json.loads(Path(out).read_text()).items():
                    results[kind][str(world)].append(seconds)
    rows = {}
    for kind, by_world in results.items():
        one, two = statistics.median(by_world["1"]), statistics.median(by_world["2"])
        rows[kind] = {"one_proc_s": one, "two_procs_s": two, "ratio": two / one}
    base = rows["bn"]["two_procs_s"]
    for row in rows.values():
        row["vs_ddp_bn"] = row["two_procs_s"] / base
    return {
        "what": f"ResNet-18 classifier step, per-device batch {batch}, {size} px, 1 thread "
        "per process (world size 1: no DDP, sync layers on their no-collective path)",
        "rows": rows,
    }


def markdown(res: dict) -> str:
    o, d, p = res["trainer_overhead"], res["data_pipeline"], res.get("ddp_cpu")
    lines = [
        f"{res['date']}, {res['machine']}.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| trainer step / hand-written loop step ({o['what']}) | **{o['ratio']:.3f}x** "
        f"({1000 * o['trainer_step_s']:.0f} vs {1000 * o['hand_loop_step_s']:.0f} ms, "
        f"medians of {len(o['samples']['trainer'])}; per repeat {o['ratio_range'][0]:.3f}-"
        f"{o['ratio_range'][1]:.3f}; target <= {o['target']}) |",
        f"| shapes loader alone ({d['what']}) | {d['loader_images_per_s']:.0f} images/s |",
        f"| model consumption (training step, in-memory batches) | "
        f"{d['model_images_per_s']:.1f} images/s (loader / model = "
        f"**{d['loader_over_model']:.1f}x**) |",
        *(
            f"| trainer step with the real loader at data.num_workers={w} / with in-memory "
            f"batches | **{r['over_in_memory']:.3f}x** ({1000 * r['trainer_step_s']:.0f} vs "
            f"{1000 * d['trainer_step_in_memory_s']:.0f} ms) |"
            for w, r in d["by_workers"].items()
        ),
    ]
    if p is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"DDP on the CPU ({p['what']}):",
        "",
        "| norm | 1 process (ms) | 2 gloo processes (ms) | 2 / 1 | vs 2-process BN |",
        "|---|---|---|---|---|",
    ]
    for kind, r in p["rows"].items():
        lines.append(
            f"| {kind} | {1000 * r['one_proc_s']:.0f} | {1000 * r['two_procs_s']:.0f} | "
            f"{r['ratio']:.2f}x | {r['vs_ddp_bn']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--data-root", default=str(ROOT / "data" / "shapes"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible")
        global RUN
        RUN = DistEnv(0, 1, 0, torch.device("cuda", 0), "nccl")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    short, long, ddp_steps = (2, 5, 3) if args.quick else (10, 60, 20)
    if args.quick:
        args.repeats = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "quick": args.quick,
        "device": args.device,
    }
    # --quick: a small generated set (the loader alone then reads fewer distinct files).
    data = [f"data.root={args.data_root}", *(["data.num_train=64"] if args.quick else [])]
    res["trainer_overhead"] = trainer_overhead(args.repeats, short, long, data)
    print(json.dumps(res["trainer_overhead"]), flush=True)
    # --quick: the detection preset at 64 px (its steps, not its set-up, are what cost).
    det = [*data, *(["data.image_size=64"] if args.quick else [])]
    res["data_pipeline"] = data_pipeline(args.repeats, short, long, det)
    print(json.dumps(res["data_pipeline"]), flush=True)
    if args.device == "cpu":  # gloo processes on this machine's cores
        res["ddp_cpu"] = ddp_cpu(args.repeats, ddp_steps)
    name = "speed" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

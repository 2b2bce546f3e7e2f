"""Whole training steps, per model, norm and execution mode: what a user's step costs.

    python -m bench.models --device cuda            # the full grid (needs a GPU)
    python -m bench.models --device cpu --quick     # small models, smoke-test size

Cases: ResNet-50 at 224 px, batch 4 and 32 (classification); FCOS-R50-FPN at 640 px,
batch 2 (detection; the head is GroupNorm + WS as the policy builds it).  Norms in the
backbone (and FPN): bn, brn, gn, syncbn (one rank of a real process group: its
no-collective path).  Modes: ``eager``; ``graphed`` (CUDA only: ``trainer.graphs``
captures forward+backward of the static part); ``compiled`` (``train.compile``: the
classifier whole, the detector's backbone + FPN).  Dtypes: fp32 and bf16 autocast.

Every step is the trainer's own ``train_step`` on a ``Training`` bundle (SGD, the
optimizer step included); ``hand`` is a minimal PyTorch loop on the same eager model
(forward, loss, backward, step, zero_grad).  Modes of one (case, norm, dtype) are timed
round-robin in blocks, so machine noise hits them alike; medians of ``--repeats``.
Writes ``models_<device>.json`` and ``.md`` (``models_<device>_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.common import machine, sync_device
from norms import NormChoice
from trainer.distributed import free_port
from trainer.graphs import capture
from trainer.models import build_model
from trainer.step import train_step
from trainer.training import Training, compile_static_part

ROOT = Path(__file__).resolve().parents[1]

# (name, arch, image size, batch)
FULL = [
    ("resnet50_224_b4", "resnet50", 224, 4),
    ("resnet50_224_b32", "resnet50", 224, 32),
    ("fcos_r50_640_b2", "fcos_resnet50_fpn", 640, 2),
]
QUICK = [("resnet18_32_b2", "resnet18", 32, 2), ("fcos_r18_64_b2", "fcos_resnet18_fpn", 64, 2)]
NORMS = ("bn", "brn", "gn", "syncbn")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _plan(kind: str, detection: bool) -> dict[str, NormChoice]:
    plan = {"backbone": NormChoice("backbone", kind, False)}
    if detection:
        plan["neck"] = NormChoice("neck", kind, False)
        plan["head"] = NormChoice("head", "gn", True)
    return plan


def _batch(arch: str, size: int, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    if not arch.startswith(("fcos", "retinanet")):
        labels = torch.randint(0, 10, (batch,), generator=g)
        return images.to(device), labels.to(device), None
    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.6, size * 0.7]], device=device)
    targets = [{"boxes": box, "labels": torch.tensor([1], device=device)}] * batch
    return [im.to(device) for im in images], targets


def _training(arch, kind, size, batch, device, amp_dtype, mode, backend) -> Training:
    detection = arch.startswith(("fcos", "retinanet"))
    torch.manual_seed(0)
    model = build_model(
        arch,
        10 if not detection else 3,
        _plan(kind, detection),
        image_size=size,
        fpn_channels=256 if "50" in arch else 64,
        brn={"warmup_steps": 5000},  # ramping: the device-side limits are in the step
    ).to(device)
    task = "detection" if detection else "classification"
    if mode == "compiled":
        compile_static_part(model, task, backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    t = Training(
        model=model,
        net=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
        scaler=torch.amp.GradScaler(device, enabled=False),
        amp_dtype=amp_dtype,
        task=task,
        device=torch.device(device),
        grad_accum=1,
        per_device_batch=batch,
        global_batch=batch,
        clip_grad_norm=None,
    )
    if mode == "graphed":
        batch_ = _batch(arch, size, batch, device)
        sample = batch_[0] if task == "classification" else model.transform(batch_[0])[0].tensors
        capture(model, task, sample.detach().clone(), amp_dtype)
        t.graphed = True
    return t


def _hand_step(t: Training, batch) -> None:
    """The minimal loop a user would write around the same model."""
    with torch.autocast(
        t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None
    ):
        if t.task == "detection":
            loss = sum(t.model(*batch).values())
        else:
            loss = nn.functional.cross_entropy(t.model(batch[0]), batch[1])
    loss.backward()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)


def measure(steps: dict, device: str, repeats: int, block: int) -> dict[str, float]:
    """Median seconds per step of each callable, timed round-robin in blocks."""
    for fn in steps.values():
        for _ in range(3):  # warm-up: allocator, cuDNN autotuning, compilation
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(repeats):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            sync_device(device)
            t0 = time.perf_counter()
            for _ in range(block):
                steps[name]()
            sync_device(device)
            times[name].append((time.perf_counter() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_case(case, kind, dtype, device, repeats, block, backend) -> dict:
    name, arch, size, batch = case
    amp = DTYPES[dtype]
    modes = ["eager", "compiled"] + (["graphed"] if device == "cuda" else [])
    runs = {m: _training(arch, kind, size, batch, device, amp, m, backend) for m in modes}
    data = _batch(arch, size, batch, device)
    steps = {m: (lambda t=t: train_step(t, [data])) for m, t in runs.items()}
    steps["hand"] = lambda: _hand_step(runs["eager"], data)
    med = measure(steps, device, repeats, block)
    return {"case": name, "norm": kind, "dtype": dtype, "ms": {k: v * 1e3 for k, v in med.items()}}


def markdown(rows: list[dict], meta: dict) -> str:
    modes = [m for m in ("eager", "graphed", "compiled") if m in rows[0]["ms"]]
    bn = {(r["case"], r["dtype"]): r["ms"] for r in rows if r["norm"] == "bn"}
    head = "| case | norm | dtype | " + " | ".join(f"{m} ms" for m in modes)
    head += " | " + " | ".join(f"{m} / eager" for m in modes[1:])
    head += " | " + " | ".join(f"vs bn ({m})" for m in modes) + " | trainer / hand |"
    lines = [
        f"{meta['machine']}; {meta['date']}; medians of {meta['repeats']} x {meta['block']} steps",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        ms, ref = r["ms"], bn.get((r["case"], r["dtype"]), r["ms"])
        cells = [f"{ms[m]:.1f}" for m in modes]
        cells += [f"{ms[m] / ms['eager']:.2f}x" for m in modes[1:]]
        cells += [f"{ms[m] / ref[m]:.2f}x" for m in modes]
        cells.append(f"{ms['eager'] / ms['hand']:.3f}x")
        lines.append(f"| {r['case']} | {r['norm']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--quick", action="store_true", help="small models, 1 repeat")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    cases = QUICK if args.quick else FULL
    dtypes = args.dtypes or (["fp32"] if args.quick else list(DTYPES))
    repeats, block = (1, 1) if args.quick else (args.repeats, args.block)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    # A real process group of size 1: syncbn takes its no-collective path, as on 1 GPU.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    rows = []
    try:
        for case in cases:
            for kind in args.norms:
                for dtype in dtypes:
                    row = bench_case(
                        case, kind, dtype, args.device, repeats, block, args.compile_backend
                    )
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        dist.destroy_process_group()
    meta = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": repeats,
        "block": block,
        "device": args.device,
    }
    name = f"models_{args.device}" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run logging on rank 0: metrics.jsonl (always), Weights & Biases (offline by default),
the progress line and the end-of-run summary.

metrics.jsonl is append-only, one JSON object per line, flushed per row: it survives any
crash with at most the row being written.  wandb is best effort: if it cannot start (no
network, bad key) or fails mid-run, training warns once and goes on without it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["RunLogger", "Progress", "peak_memory_mb", "print_summary"]


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        wandb_mode: str,
        project: str,
        entity: str | None,
        name: str,
        config: dict,
        run_id: str | None,
        init_timeout: float = 90.0,
    ):
        self.enabled = enabled
        self.run_id = run_id
        self._wandb = None
        self.wandb_error: str | None = None  # why wandb was dropped, if it was
        if not enabled:
            return
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if wandb_mode == "disabled":
            return
        try:
            import wandb

            self._wandb = wandb.init(
                project=project,
                entity=entity,
                name=name,
                dir=str(run_dir),
                mode=wandb_mode,
                id=run_id,
                resume="allow",
                config=config,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=init_timeout),
            )
            self.run_id = self._wandb.id
        except Exception as e:  # noqa: BLE001 - any failure means "train without wandb"
            self._disable(f"wandb could not start ({type(e).__name__}: {e})")

    def _disable(self, why: str) -> None:
        warnings.warn(f"{why}; training continues, metrics still go to metrics.jsonl", stacklevel=3)
        self._wandb = None
        self.wandb_error = why

    def log(self, row: dict, extra_wandb: dict | None = None) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({**row, **(extra_wandb or {})}, step=row.get("step"))
            except Exception as e:  # noqa: BLE001
                self._disable(f"wandb.log failed ({type(e).__name__}: {e})")

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._wandb is None:
            return
        try:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, commit=False)
        except Exception as e:  # noqa: BLE001
            self._disable(f"wandb table failed ({type(e).__name__}: {e})")

    @property
    def wandb_active(self) -> bool:
        return self._wandb is not None

    def log_detections(self, step: int, images, outputs, categories, score_thresh=0.3):
        """A few validation images with their predicted boxes (wandb.Image boxes)."""
        if self._wandb is None:
            return
        try:
            import wandb

            names = {i + 1: c["name"] for i, c in enumerate(categories)}
            panels = []
            for image, out in zip(images, outputs, strict=True):
                boxes = [
                    {
                        "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
                        "domain": "pixel",
                        "class_id": int(label),
                        "box_caption": f"{names.get(int(label), label)} {score:.2f}",
                        "scores": {"score": float(score)},
                    }
                    for (x0, y0, x1, y1), label, score in zip(
                        out["boxes"].tolist(),
                        out["labels"].tolist(),
                        out["scores"].tolist(),
                        strict=True,
                    )
                    if score >= score_thresh and int(label) in names
                ]
                pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()
                panels.append(
                    wandb.Image(
                        pixels,
                        boxes={"predictions": {"box_data": boxes, "class_labels": names}},
                    )
                )
            # One key per image: wandb wants the images of one key in one size, and
            # detection images keep their own (mixed sizes warn and are resized).
            self._wandb.log({f"val/predictions/{i}": p for i, p in enumerate(panels)}, step=step)
        except Exception as e:  # noqa: BLE001
            self._disable(f"wandb images failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                print(f"warning: wandb.finish failed: {e}", file=sys.stderr)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Progress:
    """tqdm on an interactive terminal, plain lines otherwise (logs, CI).  ``advance`` is
    called every step and reads nothing; ``report`` at log points, with the numbers."""

    # Off a terminal: a line at the first step, then at least this often (seconds), so
    # a slow start or a long log_interval never looks like a hang.
    EVERY_S = 30.0

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        self.enabled, self.total = enabled, total
        self.step, self.t0 = initial, time.perf_counter()
        self.last_line = None  # perf_counter of the last plain line
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        """Every step; reads nothing from the device."""
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            now = time.perf_counter()
            if self.last_line is None or now - self.last_line >= self.EVERY_S:
                self.last_line = now
                print(
                    f"step {self.step}/{self.total}  ({now - self.t0:.0f} s since start)",
                    flush=True,
                )

    def report(self, step: int, loss: float, ips: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
        elif self.enabled:
            self.last_line = time.perf_counter()
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {ips:.1f} img/s  lr {lr:.2e}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(final: dict, run_dir: Path, newest: Path | None, logger: RunLogger, mode: str):
    """The end-of-run message: final metrics, where the outputs are, wandb's state."""
    print(
        f"\nfinal eval: {json.dumps(final)}\noutputs in {run_dir}/ (config.yaml, "
        f"policy.json, metrics.jsonl, checkpoints/{newest.name if newest else ''})"
    )
    if logger.wandb_error:
        print(f"wandb was dropped during the run ({logger.wandb_error}); metrics.jsonl is complete")
    elif mode == "offline":
        print(f"wandb (offline): upload with `wandb sync {run_dir}/wandb/offline-run-*`")

"""Run logging on rank 0: metrics.jsonl (always) and Weights & Biases (offline by default).

metrics.jsonl is append-only, one JSON object per line, flushed per row: it survives any
crash with at most the row being written.  wandb is best effort: if it cannot start (no
network, bad key) or fails mid-run, training warns once and goes on without it.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

__all__ = ["RunLogger"]


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
    def wandb_dir(self) -> str | None:
        return getattr(self._wandb, "dir", None) if self._wandb is not None else None

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                print(f"warning: wandb.finish failed: {e}", file=sys.stderr)

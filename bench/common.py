"""Shared by the bench scripts: the machine description, and the resumable cell store."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, cores, torch version (and the GPU, if any): the context of a number."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        desc += f"; {torch.cuda.get_device_name()}"
    return desc


def _matches(row: dict, keys: dict) -> bool:
    return all(row.get(k) == v for k, v in keys.items())


class CellStore:
    """One JSON file per finished study cell, reused when present with the same recipe:
    a grid that a session's end interrupts continues where it stopped."""

    def __init__(self, folder: Path, name):
        self.folder, self.name = Path(folder), name  # name(cell) -> file stem
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cell: dict) -> Path:
        return self.folder / f"{self.name(cell)}.json"

    def get(self, cell: dict) -> dict | None:
        path = self._path(cell)
        if not path.is_file():
            return None
        row = json.loads(path.read_text())
        return row if _matches(row, cell) else None

    def all(self, recipe: dict) -> list[dict]:
        """Every stored cell trained with ``recipe``, whatever grid wrote it."""
        rows = [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]
        return [r for r in rows if _matches(r, recipe)]

    def put(self, row: dict) -> dict:
        path = self._path(row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        os.replace(tmp, path)
        return row

"""Writing a file so that a crash never leaves a half-written one under its name: the
data goes to a temporary file in the same folder, is flushed and fsynced, then renamed
into place, and the rename is fsynced too.  Checkpoints, config.yaml, policy.json and
eval.json are all written this way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "write_atomic"]


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the
    block ends, and is removed (``path`` untouched) when the block raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)

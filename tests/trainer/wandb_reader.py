"""Read the history rows back from an offline wandb run's ``run-<id>.wandb`` file.

The file is wandb's record log: a 7-byte header (``:W&B``, 2-byte id, version), then the
LevelDB log format (32 KiB blocks; each chunk = crc32c(4) + length(2) + type(1) +
payload; types FULL=1, FIRST=2, MIDDLE=3, LAST=4) carrying ``wandb_internal_pb2.Record``
protobufs.  wandb has no offline reader, so the test carries this small one.
"""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb record log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict]:
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in r.history.item
                }
            )
    return rows


def wandb_runs(folder: Path) -> dict:
    """Each offline run under a wandb folder, by display name: its group and its history
    (rows merged)."""
    out = {}
    for log in Path(folder).glob("offline-run-*/run-*.wandb"):
        run = _run_record(log)
        merged = {k: v for row in history(log) for k, v in row.items()}
        out[run.display_name] = {"group": run.run_group, "history": merged}
    return out


def _run_record(log: Path, wait_s: float = 20.0):
    """The run's own record.  wandb's service writes the file from another process, and
    on a loaded machine it may still be flushing when ``finish()`` has returned: read
    again for a while before giving up."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"]
        if found or time.monotonic() > deadline:
            assert found, f"{log} has no run record after {wait_s} s"
            return found[0]
        time.sleep(0.5)

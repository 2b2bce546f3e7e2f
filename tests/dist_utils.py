"""Run a function on N gloo processes over 127.0.0.1 (never any other address)."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    # Pin gloo to the loopback interface: without it gloo binds to whatever the host
    # name resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world: int, *args, timeout: float = 180.0) -> None:
    """Spawn ``fn(rank, world, *args)`` on ``world`` processes; fail (not hang) on timeout."""
    ctx = mp.start_processes(
        _entry,
        args=(world, free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"gloo workers did not finish within {timeout}s (hang?)")

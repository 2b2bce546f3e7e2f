"""torchrun environment -> process group, device, and the few collectives the loop uses.

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the process joins a group:
nccl on CUDA, gloo on CPU.  Otherwise it is a plain single process with no group at all.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from norms import SyncBatchNorm, SyncBatchRenorm, resolve_device, running_stat_layers

__all__ = [
    "DistEnv",
    "init_distributed",
    "teardown",
    "any_flag",
    "average_local_bn_stats",
    "free_port",
    "spawn_gloo",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str, backend: str, timeout_s: int) -> DistEnv:
    """``device``: auto|cpu|cuda; ``backend``: auto|nccl|gloo (auto: nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, backend = resolve_device(device, backend, cuda_available=torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        dist.init_process_group(
            backend,
            timeout=timeout,
            device_id=dev if device == "cuda" else None,
            **({} if store is None else {"store": store, "rank": rank, "world_size": world}),
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return DistEnv(rank, world, local_rank, dev, backend, local_world)


def _attempt_store(timeout: timedelta):
    """torchrun's shared store, namespaced by restart attempt; None outside torchrun.

    torchrun (>= 2.4) hands every restart attempt the same agent-hosted TCPStore, and
    the env:// rendezvous adds no per-attempt prefix, so after an elastic restart the
    store still holds the dead attempt's keys, gloo's listening addresses included.  A
    new worker that reads one of them before its peer overwrites it connects to a port
    nobody listens on ("connectFullMesh failed ... Connection refused").  Prefixing the
    keys with TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"normpilot/attempt_{attempt}", store)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_flag(env: DistEnv, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if env.world_size == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


@torch.no_grad()
def average_local_bn_stats(model: nn.Module, env: DistEnv) -> int:
    """Average running stats of BN-family layers across all ranks (timm's --dist-bn
    reduce), so eval and checkpoints don't depend on rank 0's shard or group alone.
    Returns the layers averaged."""
    if env.world_size == 1:
        return 0
    # Synchronized layers over every rank already agree; those synchronized in smaller
    # groups agree within their group only, so they are averaged too (eval and saved
    # weights then do not depend on which group rank 0 sits in).
    layers = [m for m in running_stat_layers(model) if not _synced_over_all(m, env)]
    for m in layers:
        for buf in (m.running_mean, m.running_var):
            dist.all_reduce(buf)
            buf.div_(env.world_size)
    return len(layers)


def _synced_over_all(m: nn.Module, env: DistEnv) -> bool:
    if not isinstance(m, (SyncBatchNorm, SyncBatchRenorm)):
        return False
    group = m.process_group
    return group is None or dist.get_world_size(group) == env.world_size


# -- local multi-process jobs (tests, benches): gloo over 127.0.0.1, never another address --
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    # Pin gloo to the loopback interface: without it gloo binds to whatever the host
    # name resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, *args, timeout: float | None = 180.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in one gloo
    group on 127.0.0.1; a worker's exception is re-raised here, and a job still running
    after ``timeout`` seconds is killed (a hang fails instead of blocking forever)."""
    ctx = mp.start_processes(
        _gloo_entry,
        args=(world, free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if deadline is not None and time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"gloo workers did not finish within {timeout}s (hang?)")

"""How many CPUs a training process may use, and how it splits them between torch's
intra-op threads and the data loader's worker processes."""

from __future__ import annotations

import os

__all__ = ["cpus_available", "resolve_threads"]


def cpus_available() -> int:
    """CPUs this process may run on (taskset, cgroups under SLURM), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(setting, local_world_size: int, workers: int) -> tuple[int, str]:
    """(intra-op threads, why) for one training process."""
    if setting != "auto":
        return setting, "run.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    share = max(1, cpus_available() // max(1, local_world_size))
    threads = max(1, share - min(workers, share // 2))
    return threads, (
        f"auto: {cpus_available()} CPUs / {local_world_size} process(es), {workers} data worker(s)"
    )

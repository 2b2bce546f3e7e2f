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
    """(intra-op threads, why) for one training process: ``auto`` is OMP_NUM_THREADS when
    set, else this process's share of the CPUs it may run on.

    No CPU is held back for the loader workers: they fill a bounded prefetch queue and
    then wait, while the step's threads compute.  Measured on 2 CPUs (bench/threads.py):
    one process trains faster with 2 threads than with 1 next to its 2 workers, and two
    processes are several times faster with 1 thread each than with torch's default of
    every CPU in every process, which oversubscribes the machine."""
    if setting != "auto":
        return setting, "run.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    threads = max(1, cpus_available() // max(1, local_world_size))
    return threads, (
        f"auto: {cpus_available()} CPUs / {local_world_size} process(es); {workers} data worker(s)"
    )

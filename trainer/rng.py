"""Random number generators: seeding a run, and each rank's RNG state as a tensor that
a checkpoint holds and ``torch.load(weights_only=True)`` reads back."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed import DistEnv

__all__ = ["gather_rng", "restore_rng", "rng_blob", "seed_everything"]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_blob() -> torch.Tensor:
    # Serialized to bytes: object collectives and weights_only loading both handle a
    # plain uint8 tensor, and each rank's state is kept whole.
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def restore_rng(blob: torch.Tensor) -> None:
    state = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng(env: DistEnv) -> list[torch.Tensor]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if env.world_size == 1:
        return [rng_blob()]
    blobs = [None] * env.world_size
    dist.all_gather_object(blobs, rng_blob().numpy().tobytes())
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

"""The training batch stream: epochs of a loader, resumable at any batch.

``loader(epoch=E, skip_batches=K)`` is the one place a training loader is made (the
trainer's default is ``trainer.data.train_loader`` with the run's settings; benchmarks
pass an in-memory one).  The stream remembers where it is, ``(epoch, pos)`` with ``pos``
the batches of ``epoch`` already taken, which is what a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

__all__ = ["BatchStream", "LoaderFactory"]

LoaderFactory = Callable[..., Iterable]  # (*, epoch: int, skip_batches: int) -> batches


class BatchStream:
    def __init__(self, loader: LoaderFactory, epoch: int = 0, pos: int = 0):
        self.loader, self.epoch, self.pos = loader, epoch, pos
        self._it: Iterator | None = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.pos

    def rewind(self, position: tuple[int, int]) -> None:
        """Back to ``position``: batches taken since then were not trained."""
        self.epoch, self.pos = position
        self._it = None

    def take(self, n: int) -> list:
        """The next ``n`` batches, starting a new epoch when one runs out."""
        return [self._next() for _ in range(n)]

    def _next(self):
        if self._it is None:
            self._it = iter(self.loader(epoch=self.epoch, skip_batches=self.pos))
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._it = iter(self.loader(epoch=self.epoch, skip_batches=0))
            batch = next(self._it)
        self.pos += 1
        return batch

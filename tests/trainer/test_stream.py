"""The resumable batch stream: epochs, positions, rewind."""

from trainer.data.stream import BatchStream


def epochs_of(n: int):
    """A loader factory over batches named (epoch, index), ``n`` per epoch."""
    calls = []

    def loader(*, epoch: int, skip_batches: int):
        calls.append((epoch, skip_batches))
        return iter([(epoch, i) for i in range(skip_batches, n)])

    return loader, calls


def test_take_crosses_epochs_and_counts_position():
    loader, calls = epochs_of(3)
    s = BatchStream(loader)
    assert s.take(2) == [(0, 0), (0, 1)] and s.position == (0, 2)
    assert s.take(2) == [(0, 2), (1, 0)] and s.position == (1, 1)
    assert calls == [(0, 0), (1, 0)]


def test_resume_mid_epoch_starts_at_the_saved_batch():
    loader, calls = epochs_of(4)
    s = BatchStream(loader, epoch=2, pos=3)
    assert s.take(2) == [(2, 3), (3, 0)]
    assert calls == [(2, 3), (3, 0)]


def test_rewind_refetches_from_the_position():
    loader, calls = epochs_of(3)
    s = BatchStream(loader)
    s.take(1)
    before = s.position
    s.take(3)  # taken but not trained (a stop request)
    s.rewind(before)
    assert s.position == (0, 1) and s.take(1) == [(0, 1)]
    assert calls[-1] == (0, 1)

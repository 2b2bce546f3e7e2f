"""norms.precise_bn against an independent float64 reference, and what it must not
touch; the synchronized version on 2 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norms import BatchRenorm2d, SyncBatchNorm, SyncBatchRenorm, group_norm, precise_bn
from tests.norms.reference import precise_stats
from trainer.distributed import spawn_gloo

EPS = 1e-5


class _DrawsRandomNumbers(nn.Module):
    """Consumes the global RNG on every forward (adds 0): precise_bn must not let it move."""

    def forward(self, x):
        return x + 0 * torch.rand_like(x)


def net(norm1, norm2):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        norm1,
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        norm2,
        group_norm(6),
        _DrawsRandomNumbers(),
    ).double()
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


def batches(k, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(k)]


def reference(model, xs):
    conv1, n1, conv2, n2 = model[0], model[1], model[3], model[4]
    stages = [
        (lambda x: conv1(x), n1.weight, n1.bias),
        (lambda h: conv2(F.relu(h)), n2.weight, n2.bias),
    ]
    with torch.no_grad():
        return precise_stats(xs, stages, EPS)


@pytest.mark.parametrize(
    "norm1,norm2",
    [
        (lambda: nn.BatchNorm2d(4), lambda: nn.BatchNorm2d(6, momentum=None)),
        # Batch Renorm mid-ramp, with running stats far from the data: r/d must be off.
        (lambda: BatchRenorm2d(4, warmup_steps=4), lambda: BatchRenorm2d(6, warmup_steps=0)),
        (lambda: SyncBatchNorm(4), lambda: SyncBatchRenorm(6)),  # no group: local path
    ],
)
def test_matches_reference_and_touches_nothing_else(norm1, norm2):
    model = net(norm1(), norm2())
    model.train()
    for x in batches(3, seed=7):  # some training first: running stats and counts move
        model(x)
    model[5].eval()  # a mixed-mode model: every module's mode must come back
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.running_mean.fill_(5.0)
    params = {k: v.clone() for k, v in model.named_parameters()}
    counts = [int(model[i].num_batches_tracked) for i in (1, 4)]
    limits = [getattr(model[i], "rmax", None) for i in (1, 4)]
    modes = [m.training for m in model.modules()]
    xs = batches(5)
    state = torch.get_rng_state()

    assert precise_bn(model, iter(xs), num_batches=4) == 4

    assert torch.equal(torch.get_rng_state(), state)
    for (mean, var), i in zip(reference(model, xs[:4]), (1, 4), strict=True):
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-12, atol=1e-12)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]) and v.grad is None, k
    assert [int(model[i].num_batches_tracked) for i in (1, 4)] == counts
    assert [getattr(model[i], "rmax", None) for i in (1, 4)] == limits
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.1


def test_fewer_batches_than_asked_and_bad_input():
    model = net(nn.BatchNorm2d(4), nn.BatchNorm2d(6))
    xs = batches(2)
    assert precise_bn(model, xs, num_batches=10) == 2
    (m1, v1), _ = reference(model, xs)
    torch.testing.assert_close(model[1].running_var, v1, rtol=1e-12, atol=1e-12)
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="empty"):
        precise_bn(model, [], num_batches=3)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        precise_bn(model, xs, num_batches=0)

    def broken():
        yield xs[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        precise_bn(model, broken())
    assert torch.equal(model[1].running_mean, before)  # a failure puts the old stats back
    assert model[1].momentum == 0.1


def test_frozen_and_group_norm_are_left_alone():
    from torchvision.ops import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), group_norm(4)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert precise_bn(model, batches(2)) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


SPLITS = (2, 3)  # uneven shards: rank 0 holds 2 samples of each batch, rank 1 holds 3


def _sync_worker(rank, world, out):
    for kind in ("syncbn", "syncbrn"):
        cls = SyncBatchNorm if kind == "syncbn" else SyncBatchRenorm
        model = net(cls(4), cls(6))
        lo = sum(SPLITS[:rank])
        shards = [x[lo : lo + SPLITS[rank]] for x in batches(4, n=sum(SPLITS))]
        precise_bn(model, shards, num_batches=4)
        torch.save(
            {i: (model[i].running_mean, model[i].running_var) for i in (1, 4)},
            f"{out}/{kind}_{rank}.pt",
        )


@pytest.mark.dist
def test_sync_layers_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    spawn_gloo(_sync_worker, 2, str(tmp_path))
    for kind in ("syncbn", "syncbrn"):
        got = [torch.load(tmp_path / f"{kind}_{r}.pt") for r in range(2)]
        model = net(nn.BatchNorm2d(4), nn.BatchNorm2d(6))  # same weights (seed 0)
        expected = reference(model, batches(4, n=sum(SPLITS)))
        for rank in range(2):
            for (mean, var), i in zip(expected, (1, 4), strict=True):
                torch.testing.assert_close(got[rank][i][0], mean, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(got[rank][i][1], var, rtol=1e-10, atol=1e-10)

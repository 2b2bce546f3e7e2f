"""SyncBatchNorm / SyncBatchRenorm on 2 gloo processes vs one process on the
concatenated batch (float64), plus the no-group fallback paths."""

import pytest
import torch
from torch import nn

from norms import BatchRenorm2d, SyncBatchNorm, SyncBatchRenorm
from tests.norms.reference import batch_renorm_step
from trainer.distributed import spawn_gloo

C, H, W = 3, 4, 2
WEIGHT = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
BIAS = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
STEPS = 4
SPLITS = [(3, 5), (0, 4), (1, 1), (0, 0)]
BRN_HP = dict(eps=1e-5, momentum=0.2, rmax=1.5, dmax=0.5, warmup_steps=2)


def full_batches(split, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(split)
    shift = torch.tensor([0.0, 2.0, -3.0], dtype=torch.float64).view(1, C, 1, 1)
    for t in range(STEPS):
        x = torch.randn(n, C, H, W, generator=g, dtype=torch.float64) * (1 + t) + shift * t
        yield x, torch.randn(n, C, H, W, generator=g, dtype=torch.float64)


def make_layer(kind):
    if kind == "syncbn":
        layer = SyncBatchNorm(C, momentum=0.2)
    else:
        layer = SyncBatchRenorm(C, **BRN_HP)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(WEIGHT)
        layer.bias.copy_(BIAS)
    return layer


def _worker(rank, world, out_dir):
    results = {}
    for kind in ("syncbn", "syncbrn"):
        for split in SPLITS:
            layer = make_layer(kind)
            lo = sum(split[:rank])
            steps = []
            for x, dy in full_batches(split, seed=sum(split)):
                xr = x[lo : lo + split[rank]].clone().requires_grad_()
                layer.zero_grad()
                y = layer(xr)
                (y * dy[lo : lo + split[rank]]).sum().backward()
                steps.append(
                    dict(
                        y=y.detach(),
                        gx=xr.grad,
                        gw=layer.weight.grad.clone(),
                        gb=layer.bias.grad.clone(),
                        mean=layer.running_mean.clone(),
                        var=layer.running_var.clone(),
                        nbt=int(layer.num_batches_tracked),
                    )
                )
            results[kind, split] = steps
    # bf16 autocast: stats reduced in fp32, output bf16 and finite.
    layer = SyncBatchNorm(C)
    x = torch.randn(4 + rank, C, H, W) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    y.float().sum().backward()
    results["bf16"] = dict(
        dtype=y.dtype, finite=bool(torch.isfinite(y.float()).all()), mean=layer.running_mean.clone()
    )
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    spawn_gloo(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference_steps(kind, split):
    """One process on the concatenated batch: nn.BatchNorm2d or the BRN formulas."""
    steps = []
    if kind == "syncbn":
        layer = nn.BatchNorm2d(C, momentum=0.2).double()
        with torch.no_grad():
            layer.weight.copy_(WEIGHT)
            layer.bias.copy_(BIAS)
    else:
        w = WEIGHT.clone().requires_grad_()
        b = BIAS.clone().requires_grad_()
        state = dict(
            mean=torch.zeros(C, dtype=torch.float64), var=torch.ones(C, dtype=torch.float64), nbt=0
        )
    for x, dy in full_batches(split, seed=sum(split)):
        x = x.clone().requires_grad_()
        if kind == "syncbn":
            layer.zero_grad()
            y = layer(x)
            (y * dy).sum().backward()
            gw, gb = layer.weight.grad, layer.bias.grad
            mean, var, nbt = layer.running_mean, layer.running_var, layer.num_batches_tracked
        else:
            w.grad = b.grad = None
            y = batch_renorm_step(x, w, b, state, **BRN_HP)
            (y * dy).sum().backward()
            gw, gb = w.grad, b.grad
            mean, var, nbt = state["mean"], state["var"], state["nbt"]
        steps.append(
            dict(
                y=y.detach(),
                gx=x.grad,
                gw=gw.clone(),
                gb=gb.clone(),
                mean=mean.clone(),
                var=var.clone(),
                nbt=int(nbt),
            )
        )
    return steps


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["syncbn", "syncbrn"])
@pytest.mark.parametrize("split", SPLITS[:3], ids=lambda s: f"{s[0]}+{s[1]}")
def test_two_ranks_equal_one_process_on_concatenated_batch(gloo_results, kind, split):
    ranks = [res[kind, split] for res in gloo_results]
    for t, ref in enumerate(reference_steps(kind, split)):
        r0, r1 = ranks[0][t], ranks[1][t]
        close = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), ref["y"], **close)
        torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), ref["gx"], **close)
        torch.testing.assert_close(r0["gw"] + r1["gw"], ref["gw"], **close)
        torch.testing.assert_close(r0["gb"] + r1["gb"], ref["gb"], **close)
        for r in (r0, r1):
            torch.testing.assert_close(r["mean"], ref["mean"], **close)
            torch.testing.assert_close(r["var"], ref["var"], **close)
            assert r["nbt"] == ref["nbt"]
    if split[0] == 0:  # the empty rank still got (zero) parameter gradients
        assert ranks[0][0]["y"].shape[0] == 0
        assert torch.equal(ranks[0][0]["gw"], torch.zeros(C, dtype=torch.float64))


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["syncbn", "syncbrn"])
def test_empty_global_batch_moves_nothing(gloo_results, kind):
    for res in gloo_results:
        for step in res[kind, (0, 0)]:
            assert step["y"].shape[0] == 0
            assert torch.equal(step["mean"], torch.zeros(C, dtype=torch.float64))
            assert torch.equal(step["var"], torch.ones(C, dtype=torch.float64))
            assert step["nbt"] == 0


@pytest.mark.dist
def test_bf16_autocast_reduces_in_fp32(gloo_results):
    for res in gloo_results:
        assert res["bf16"]["dtype"] == torch.bfloat16 and res["bf16"]["finite"]
    # Both ranks hold the same (group-wide) running mean.
    torch.testing.assert_close(gloo_results[0]["bf16"]["mean"], gloo_results[1]["bf16"]["mean"])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_process_group_is_plain_batchnorm(momentum):
    sync, bn = SyncBatchNorm(4, momentum=momentum), nn.BatchNorm2d(4, momentum=momentum)
    for _ in range(3):
        x = torch.randn(6, 4, 3, 3) * 2 + 1
        torch.testing.assert_close(sync(x), bn(x))
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[k], v)
    assert list(sync.state_dict()) == list(bn.state_dict())


def test_no_process_group_syncbrn_is_batch_renorm():
    sync = SyncBatchRenorm(4, warmup_steps=1)
    brn = BatchRenorm2d(4, warmup_steps=1)
    for t in range(3):
        x = torch.randn(6, 4, 3, 3) * (1 + t) + t
        torch.testing.assert_close(sync(x), brn(x))
    torch.testing.assert_close(sync.running_var, brn.running_var)


def test_sync_layers_accept_any_rank_above_one():
    for layer in (SyncBatchNorm(3), SyncBatchRenorm(3)):
        assert layer(torch.randn(4, 3)).shape == (4, 3)
        assert layer(torch.randn(2, 3, 2, 2, 2)).shape == (2, 3, 2, 2, 2)
        with pytest.raises(ValueError, match="at least 2D"):
            layer(torch.randn(3))


PAIR_SPLITS = [(3, 5), (2, 1)]  # 4 ranks in 2 sync groups of 2: each pair its own batch


def _group_worker(rank, world, out_dir):
    import torch.distributed as dist

    group, _ = dist.new_subgroups(group_size=2)
    pair, index = divmod(rank, 2)
    split = PAIR_SPLITS[pair]
    lo = sum(split[:index])
    results = {}
    for kind in ("syncbn", "syncbrn"):
        layer = make_layer(kind)
        layer.process_group = group
        steps = []
        for x, dy in full_batches(split, seed=sum(split)):
            xr = x[lo : lo + split[index]].clone().requires_grad_()
            layer.zero_grad()
            y = layer(xr)
            (y * dy[lo : lo + split[index]]).sum().backward()
            steps.append(
                dict(
                    y=y.detach(),
                    gx=xr.grad,
                    gw=layer.weight.grad.clone(),
                    mean=layer.running_mean.clone(),
                    var=layer.running_var.clone(),
                )
            )
        results[kind] = steps
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.dist
def test_groups_of_two_on_four_ranks_each_equal_their_pairs_concatenated_batch(tmp_path):
    spawn_gloo(_group_worker, 4, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    close = dict(rtol=1e-8, atol=1e-8)
    for kind in ("syncbn", "syncbrn"):
        for pair, split in enumerate(PAIR_SPLITS):
            a, b = ranks[2 * pair][kind], ranks[2 * pair + 1][kind]
            for t, ref in enumerate(reference_steps(kind, split)):
                torch.testing.assert_close(torch.cat([a[t]["y"], b[t]["y"]]), ref["y"], **close)
                torch.testing.assert_close(torch.cat([a[t]["gx"], b[t]["gx"]]), ref["gx"], **close)
                torch.testing.assert_close(a[t]["gw"] + b[t]["gw"], ref["gw"], **close)
                for r in (a[t], b[t]):
                    torch.testing.assert_close(r["mean"], ref["mean"], **close)
                    torch.testing.assert_close(r["var"], ref["var"], **close)
        # The two groups really kept their own statistics.
        assert not torch.allclose(ranks[0][kind][-1]["mean"], ranks[2][kind][-1]["mean"])

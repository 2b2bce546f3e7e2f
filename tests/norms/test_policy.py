import pytest

from norms import PARTS, NormPolicy, select_norm
from trainer.explain import explain


@pytest.mark.parametrize(
    "world,batch,expected",
    [
        (1, 8, "bn"),
        (1, 64, "bn"),
        (1, 7, "gn"),
        (1, 1, "gn"),
        (4, 2, "syncbn"),  # 8 >= 8
        (2, 4, "syncbn"),
        (64, 1, "syncbn"),
        (2, 3, "gn"),  # 6 < 8
        (3, 2, "gn"),
    ],
)
@pytest.mark.parametrize("part", ["backbone", "neck"])
def test_default_table_backbone_and_neck(world, batch, expected, part):
    # No feature map size given: below min_batch the values per statistic are unknown,
    # so the policy takes the norm without batch statistics.
    choice = select_norm(world, batch, part)
    # Weight Standardization goes with GroupNorm, never with a BN-family kind.
    assert (choice.kind, choice.ws, choice.part) == (expected, expected == "gn", part)


@pytest.mark.parametrize(
    "world,batch,spatial,expected",
    [
        # one process: batch x H x W values per statistic against min_values 8
        (1, 4, 4, "brn"),  # 16 values: the detection study's Batch Renorm cell
        (1, 2, 4, "brn"),  # 8, at the bar
        (1, 1, 4, "gn"),  # 4: the detection study's GN + WS cell
        (1, 4, 1, "gn"),  # 4: the classification study (1x1 last stage)
        (1, 7, 1, "gn"),
        (1, 7, 2, "brn"),
        (1, 1, 64, "brn"),
        (1, 8, 1, "bn"),  # min_batch first: the map does not matter from 8 images
        # several processes: the combined batch
        (2, 2, 4, "syncbrn"),  # 4 x 4 = 16
        (2, 1, 4, "syncbrn"),  # 2 x 4 = 8
        (2, 1, 1, "gn"),  # 2 x 1
        (3, 2, 1, "gn"),  # 6 x 1
        (2, 4, 1, "syncbn"),  # 8 >= min_batch
    ],
)
def test_values_per_statistic_decide_below_min_batch(world, batch, spatial, expected):
    choice = select_norm(world, batch, "backbone", spatial=spatial)
    assert (choice.kind, choice.ws) == (expected, expected == "gn")
    if expected != "syncbn" and expected != "bn":
        values = world * batch * spatial
        assert f"{world * batch} x {spatial} = {values} values per statistic" in explain(choice)
        assert ("<" if expected == "gn" else ">=") + " min_values 8" in explain(choice)
        assert choice.rule == "values" and choice.values == values
    # the reason names the kind it picked, the synchronized one on several ranks
    name = {"brn": ": Batch Renorm", "syncbrn": ": synchronized Batch Renorm"}.get(expected)
    assert name is None or explain(choice).endswith(name)


def test_min_values_knob_and_bad_spatial():
    assert select_norm(1, 2, spatial=4, policy=NormPolicy(min_values=9)).kind == "gn"
    assert select_norm(1, 2, spatial=4, policy=NormPolicy(min_values=8)).kind == "brn"
    with pytest.raises(ValueError, match="min_values must be >= 1, got 0"):
        NormPolicy(min_values=0)
    with pytest.raises(ValueError, match="spatial=0"):
        select_norm(1, 2, spatial=0)


@pytest.mark.parametrize(
    "world,batch,expected",
    [(1, 7, "brn"), (1, 1, "brn"), (2, 3, "syncbrn"), (3, 2, "syncbrn"), (1, 8, "bn")],
)
def test_small_batch_brn_restores_batch_renorm(world, batch, expected):
    for spatial in (None, 1):  # whatever the values per statistic
        p = NormPolicy(small_batch="brn")
        choice = select_norm(world, batch, policy=p, spatial=spatial)
        assert (choice.kind, choice.ws) == (expected, False)
        if expected != "bn":
            brn = "synchronized Batch Renorm" if world > 1 else "Batch Renorm"
            assert f"; {brn} (norm.policy.small_batch=brn)" in explain(choice, p)


def test_small_batch_gn_says_why_and_gn_ws_knob():
    choice = select_norm(1, 2)
    assert "GroupNorm + Weight Standardization" in explain(choice)
    assert "values per statistic unknown" in explain(choice)
    forced_p = NormPolicy(small_batch="gn")
    forced = select_norm(1, 2, spatial=64, policy=forced_p)
    assert forced.kind == "gn" and "norm.policy.small_batch=gn" in explain(forced, forced_p)
    plain_p = NormPolicy(gn_ws=False)
    plain = select_norm(1, 2, "neck", plain_p)
    assert (plain.kind, plain.ws) == ("gn", False)
    assert "Weight Standardization" not in explain(plain, plain_p)
    # gn_ws is about backbone/neck; the head keeps its own head_ws
    assert select_norm(1, 2, "head", NormPolicy(gn_ws=False)).ws is True
    # an override to gn gets WS too; to a BN kind, never
    assert select_norm(1, 2, override="gn").ws is True
    assert select_norm(1, 2, override="brn").ws is False


def test_pretrained_backbone_below_min_batch_keeps_its_bn_statistics():
    choice = select_norm(1, 2, "backbone", pretrained=True)
    assert (choice.kind, choice.ws, choice.rule) == ("frozenbn", False, "pretrained")
    assert "pretrained BN weights that GroupNorm cannot reuse" in explain(choice)
    assert explain(choice).startswith("world_size 1, per_device_batch 2 < min_batch 8, and")
    assert select_norm(1, 2, "neck", pretrained=True).kind == "gn"  # the FPN has no weights
    assert select_norm(1, 32, "backbone", pretrained=True).kind == "bn"
    # Batch Renorm (enough values per statistic) reuses BN weights: no freezing needed.
    assert select_norm(1, 2, "backbone", pretrained=True, spatial=16).kind == "brn"
    brn = NormPolicy(small_batch="brn")
    assert select_norm(1, 2, "backbone", brn, pretrained=True).kind == "brn"


@pytest.mark.parametrize("world,batch", [(1, 1), (1, 64), (8, 2), (2, 4)])
def test_default_head_is_gn_with_ws(world, batch):
    choice = select_norm(world, batch, "head")
    assert (choice.kind, choice.ws, choice.impl) == ("gn", True, "plain")


def test_reasons_carry_the_numbers():
    assert explain(select_norm(4, 2)) == (
        "world_size 4 x per_device_batch 2 = 8 >= min_batch 8: SyncBN over all ranks"
    )
    assert "per_device_batch 4 < min_batch 8" in explain(select_norm(1, 4))
    assert "2 x per_device_batch 3 = 6 < min_batch 8, even combined" in explain(select_norm(2, 3))
    assert "32 groups of 64 channels" in explain(select_norm(1, 2, "head", channels=[64]))


def test_min_batch_knob():
    p = NormPolicy(min_batch=4)
    assert select_norm(1, 4, policy=p).kind == "bn"
    assert select_norm(1, 3, policy=p).kind == "gn"
    assert select_norm(2, 2, policy=p).kind == "syncbn"
    assert select_norm(8, 2, policy=NormPolicy(min_batch=32)).kind == "gn"


def test_local_bn_batch_knob():
    p = NormPolicy(local_bn_batch=32)
    choice = select_norm(4, 32, policy=p)
    assert choice.kind == "bn" and "local_bn_batch 32" in explain(choice, p)
    # With sync_group=world (every rank in one group) the knob still matters:
    world = NormPolicy(local_bn_batch=32, sync_group="world")
    assert select_norm(4, 31, policy=world).kind == "syncbn"
    assert select_norm(4, 64, policy=NormPolicy(sync_group="world")).kind == "syncbn"
    # with auto groups a batch >= min_batch needs no partner at all: local BN.
    assert select_norm(4, 64).kind == "bn" and select_norm(4, 64).sync_group_size == 1
    assert select_norm(1, 32, policy=p).kind == "bn"  # world size 1: the ordinary rule


def test_head_kind_same_and_head_ws():
    p = NormPolicy(head_kind="same", head_ws=False)
    assert (select_norm(1, 2, "head", p).kind, select_norm(1, 2, "head", p).ws) == ("gn", False)
    assert select_norm(8, 4, "head", p).kind == "syncbn"
    assert select_norm(1, 2, "head", NormPolicy(head_ws=False)).ws is False
    # WS goes with GroupNorm: a head that follows the batch rule to BN gets none, whatever
    # head_ws says
    same = select_norm(1, 16, "head", NormPolicy(head_kind="same"))
    assert (same.kind, same.ws, same.rule) == ("bn", False, "bn")
    assert select_norm(1, 2, "head", NormPolicy(head_kind="same")).ws is True  # GN: head_ws


def test_frozenbn_for_pretrained_backbone_with_freezing():
    p = NormPolicy(freeze_bn=True)
    assert select_norm(8, 2, "backbone", p, pretrained=True).kind == "frozenbn"
    assert select_norm(8, 2, "neck", p, pretrained=True).kind == "syncbn"  # only the backbone
    no_weights = select_norm(8, 2, "backbone", p)
    assert no_weights.kind == "syncbn" and "freeze_bn ignored" in explain(no_weights, p)
    assert select_norm(8, 2, "backbone", pretrained=True).kind == "syncbn"


def test_override_wins_and_says_so():
    p = NormPolicy(freeze_bn=True)
    b = select_norm(8, 2, "backbone", p, override="gn", pretrained=True)
    assert b.kind == "gn" and explain(b, p).startswith("override norm.override.backbone=gn")
    assert "policy would pick syncbn" in explain(b, p) and b.picked == "syncbn"
    h = select_norm(1, 2, "head", p, override="bn")
    assert h.kind == "bn" and not h.ws and "norm.override.head=bn" in explain(h, p)
    assert select_norm(8, 2, "neck", p, pretrained=True).kind == "syncbn"


@pytest.mark.parametrize(
    "kind,world,device,backend,impl",
    [
        ("syncbn", 8, "cuda", None, "torch-fused"),
        ("syncbn", 8, "cuda", "nccl", "torch-fused"),
        ("syncbn", 8, "cuda", "gloo", "portable"),
        ("syncbn", 8, "cpu", None, "portable"),
        ("syncbrn", 2, "cuda", "nccl", "portable"),
        ("syncbn", 1, "cuda", "nccl", "plain"),
        ("bn", 8, "cuda", "nccl", "plain"),
    ],
)
def test_impl_from_device_and_backend(kind, world, device, backend, impl):
    assert select_norm(world, 2, override=kind, device=device, backend=backend).impl == impl


def test_every_part_is_known():
    assert PARTS == ("backbone", "neck", "head")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: select_norm(0, 2), r"world_size=0"),
        (lambda: select_norm(-1, 2), r"world_size=-1"),
        (lambda: select_norm(2, 0), r"per_device_batch=0"),
        (lambda: select_norm(2, 2, "tail"), r"part='tail'.*backbone, neck, head"),
        (
            lambda: select_norm(1, 2, override="layernorm"),
            r"norm.override.backbone='layernorm'.*valid kinds: bn",
        ),
        (lambda: select_norm(1, 2, "torso", override="bn"), r"unknown part='torso'"),
        (lambda: NormPolicy(min_batch=0), r"norm.policy.min_batch.*0"),
        (lambda: NormPolicy(head_kind="bn"), r"norm.policy.head_kind.*'bn'"),
        (
            lambda: select_norm(1, 2, "head", NormPolicy(gn_groups=24), channels=[64]),
            r"gn_groups=24 does not divide the 64 channels of a head layer",
        ),
    ],
)
def test_bad_input_names_field_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gn_groups_that_divide_pass():
    p = NormPolicy(gn_groups=16)
    choice = select_norm(1, 2, "head", p, channels=[64, 256])
    assert "16 groups of 64 channels, 16 groups of 256 channels" in explain(choice, p)


@pytest.mark.parametrize(
    "world,per_node,batch,min_batch,kind,size",
    [
        (256, 8, 2, 16, "syncbn", 8),  # a node's 8 x 2 = 16 is enough: groups stay inside it
        (256, 8, 4, 16, "syncbn", 4),  # 4 x 4 = 16: half a node
        (256, 8, 3, 16, "syncbn", 8),  # 6 ranks would do; 8 is the smallest divisor of a node
        (256, 8, 32, 16, "bn", 1),  # one rank's batch is enough: local BN, no sync
        (64, 4, 1, 16, "syncbn", 16),  # a node holds only 4: the fewest nodes (4) that reach 16
        (48, 4, 1, 16, "syncbn", 16),  # 4 nodes of 4, and 16 divides 48
        (12, 4, 1, 64, "gn", 1),  # even the world is below min_batch: GroupNorm, no sync
        (8, 8, 2, 16, "syncbn", 8),  # one node, exactly enough
        (2, 1, 8, 16, "syncbn", 2),  # two 1-process nodes: a group spans both
    ],
)
def test_auto_sync_group_sizes(world, per_node, batch, min_batch, kind, size):
    p = NormPolicy(min_batch=min_batch)
    c = select_norm(world, batch, policy=p, local_world_size=per_node)
    assert (c.kind, c.sync_group_size) == (kind, size)
    assert size * batch >= min_batch or kind == "gn"


def test_sync_group_world_and_explicit_sizes():
    world = NormPolicy(sync_group="world")
    assert select_norm(256, 2, policy=world, local_world_size=8).sync_group_size == 256
    assert select_norm(12, 2, policy=NormPolicy(sync_group=4)).sync_group_size == 4
    message = "sync_group=5 does not divide world_size 12; valid sizes: 1, 2, 3, 4, 6, 12"
    with pytest.raises(ValueError, match=message):
        select_norm(12, 2, policy=NormPolicy(sync_group=5))
    assert select_norm(1, 2).sync_group_size == 1  # nothing to synchronize with

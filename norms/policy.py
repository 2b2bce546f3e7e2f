"""Which normalization each part of a model gets, from world size, per-device batch and
the size of the part's smallest normalized feature map.

BatchNorm's statistics get noisy when few samples share them.  In the GroupNorm paper
(Wu & He 2018, Fig. 1) ResNet-50's ImageNet error with BN is 23.6% at 32 images/GPU,
23.7% at 16, then 24.8% at 8, 27.3% at 4 and 34.7% at 2; GroupNorm stays at ~24% at any
batch.  Our own studies (below) put the threshold at ``min_batch = 8``.

Rules, in order of precedence (``part`` is backbone, neck or head):

1. an explicit per-part override (``override[part]``) wins;
2. backbone with pretrained weights and ``freeze_bn``: ``frozenbn``;
3. head with ``head_kind="gn"``: GroupNorm (+ Weight Standardization when ``head_ws``);
4. world_size > 1 and per_device_batch >= ``local_bn_batch`` (off by default): local BN on
   each rank, no all-reduce;
5. the batch rule.  Enough samples share the statistics (per_device_batch >= min_batch on
   one process, world_size * per_device_batch >= min_batch on several): ``bn`` /
   ``syncbn`` (in groups of ranks just large enough, see ``sync_group_size``).  Too few:
   ``small_batch``.  Its default, ``auto``, counts the values behind each channel's
   statistic at the part's smallest normalized feature map, ``values = batch x H x W``
   (``spatial`` = H x W; the combined batch on several ranks).  At least ``min_values``:
   Batch Renorm (synchronized on several ranks); fewer, or ``spatial`` unknown:
   GroupNorm + Weight Standardization, which has no batch statistics to get wrong.
   ``small_batch="gn"`` / ``"brn"`` pick one of them whatever the values.  A backbone
   loaded from pretrained BN weights gets ``frozenbn`` instead of GN (GN cannot reuse BN
   statistics).

Why these defaults (min_batch 8, min_values 8): the two studies in bench/results.  In
the classification study (study_cls.md; a 1x1 last stage, so values = batch) BN at
batch 2 and 4 collapses (35% and 91%; with 2 values per statistic a normalized channel
is only its sign) and so does every Batch Renorm variant, while GN + WS holds 98%; at
batch 8 and 16 BN is the best line.  In the detection study (study_det.md; 64 px
images, a 2x2 last stage, values = 4 x batch) Batch Renorm is the best line at batch 4
and 2 (16 and 8 values), BN at 16 (tied with GN + WS at 8), and GN + WS at batch 1
(4 values).  So: BN from 8 images, Batch Renorm below that while each statistic still
has >= 8 values, GN + WS when it has fewer.

``per_device_batch`` is the number of samples in one forward pass of one process.
Gradient accumulation runs several such passes before a step; each normalizes its own
micro-batch, so accumulation never enlarges the batch a norm layer sees and is not an
input here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from norms.registry import available_norms, is_sync_kind
from norms.words import Word

__all__ = [
    "PARTS",
    "NormChoice",
    "NormPolicy",
    "resolve_device",
    "select_norm",
    "sync_group_size",
    "sync_impl",
]

PARTS = ("backbone", "neck", "head")


class HeadKind(Word):
    gn = "gn"
    same = "same"


class SmallBatch(Word):
    auto = "auto"
    gn = "gn"
    brn = "brn"


@dataclass
class NormPolicy:
    """The policy's settings: the ``norm.policy`` section of a run's config (the trainer
    embeds this class in its schema) and ``select_norm``'s knobs.  Each comment is the
    setting's documentation."""

    # BN / SyncBN from this many samples per statistic (per device, or combined over the
    # ranks of a sync group).  8, and min_values 8, from the studies (module docstring).
    min_batch: int = 8
    local_bn_batch: int | None = None  # keep local BN at/above this per-device batch
    head_kind: HeadKind = HeadKind.gn  # gn | same (the backbone's rule)
    head_ws: bool = True  # Weight Standardization on a GroupNorm head's convs
    # Below min_batch: auto (Batch Renorm -- synchronized on several ranks -- while the
    # batch x H x W values behind each statistic at the part's smallest normalized map
    # reach min_values; else GroupNorm) | gn (GroupNorm; WS on the part's convs when
    # gn_ws) | brn (Batch Renorm).
    small_batch: SmallBatch = SmallBatch.auto
    min_values: int = 8
    gn_ws: bool = True
    freeze_bn: bool = False  # frozenbn for a backbone loaded from pretrained weights
    gn_groups: int | None = None  # null: choose_groups(C) per layer
    # Ranks per SyncBN/SyncBRN group: auto (the fewest consecutive ranks whose combined
    # batch reaches min_batch, inside a node when one can) | world | an int dividing it.
    sync_group: int | str = "auto"

    def __post_init__(self) -> None:
        def at_least(key: str, low: int, allow_none: bool = False) -> None:
            value = getattr(self, key)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                none = " or null" if allow_none else ""
                raise ValueError(f"norm.policy.{key} must be >= {low}{none}, got {value!r}")

        at_least("min_batch", 1)
        at_least("local_bn_batch", 1, allow_none=True)
        at_least("min_values", 1)
        at_least("gn_groups", 1, allow_none=True)
        for key, options in (("head_kind", HeadKind), ("small_batch", SmallBatch)):
            # (a plain select_norm call passes words; the config passes members)
            if getattr(self, key) not in set(options):
                raise ValueError(
                    f"norm.policy.{key}={getattr(self, key)!r} is not one of "
                    f"{', '.join(repr(o.value) for o in options)}"
                )
            setattr(self, key, options(getattr(self, key)))
        sync = self.sync_group
        if sync not in ("auto", "world") and (
            isinstance(sync, bool) or not isinstance(sync, int) or sync < 1
        ):
            raise ValueError(
                f"norm.policy.sync_group must be 'auto', 'world' or an integer >= 1, got {sync!r}"
            )


# Which rule decided a part (NormChoice.rule), in order of precedence.
RULES = (
    "override",  # norm.override.<part>
    "freeze_bn",  # pretrained backbone + freeze_bn: frozenbn
    "head_gn",  # head_kind=gn
    "pretrained",  # a pretrained backbone the batch rule would give GN: frozenbn
    "local_bn",  # per_device_batch >= local_bn_batch on several ranks
    "local_group",  # a sync kind whose group would be one rank: local BN
    "bn",  # one process, per_device_batch >= min_batch
    "syncbn",  # several processes, combined batch >= min_batch
    "small_batch",  # below min_batch, norm.policy.small_batch=gn|brn
    "values",  # below min_batch, batch x H x W counted against min_values
    "values_unknown",  # below min_batch, no feature map size given: GroupNorm
    "given",  # built from a record (a checkpoint's policy), not decided here
)


@dataclass(frozen=True)
class NormChoice:
    """One part's decision and the facts behind it; ``trainer.explain`` words it."""

    part: str
    kind: str
    ws: bool
    impl: str = "plain"  # "plain" | "portable" | "torch-fused"
    rule: str = "given"  # one of RULES
    sync_group_size: int = 1  # ranks whose batches one statistic covers (1: no sync)
    world_size: int = 1
    per_device_batch: int = 0
    samples: int = 0  # samples behind one statistic (combined over the ranks on several)
    spatial: int | None = None  # H x W of the part's smallest normalized map
    values: int | None = None  # samples x spatial, when counted
    picked: str | None = None  # what the batch rule picked (differs under an override)
    channels: tuple[int, ...] = ()
    freeze_ignored: bool = False  # freeze_bn set, but the backbone has no pretrained weights
    local_world_size: int | None = None  # processes per node the groups were planned for

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"NormChoice.rule={self.rule!r} is not one of {', '.join(RULES)}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("part")
        d["channels"] = list(self.channels)
        return d


def resolve_device(device: str, backend: str, *, cuda_available: bool) -> tuple[str, str]:
    """The one "auto" rule: (``device``, ``backend``) with auto resolved.

    ``device`` auto|cpu|cuda: auto is cuda when a CUDA device is visible.  ``backend``
    auto|nccl|gloo: auto is nccl on CUDA, gloo on the CPU.
    """
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    return device, backend


def sync_impl(kind: str, world_size: int, device: str, backend: str | None) -> str:
    """Which implementation runs a layer of ``kind``.

    ``torch-fused``: torch.nn.SyncBatchNorm's CUDA kernels over NCCL (syncbn on CUDA with
    a non-gloo backend); ``portable``: norms' own gather/reduce path, any device and
    backend (CPU/gloo included, and always for syncbrn); ``plain``: no collective (world
    size 1, or a kind that never synchronizes).
    """
    if not is_sync_kind(kind) or world_size == 1:
        return "plain"
    _, backend = resolve_device(device, backend or "auto", cuda_available=device == "cuda")
    if kind == "syncbn" and device == "cuda" and backend != "gloo":
        return "torch-fused"
    return "portable"


@dataclass(frozen=True)
class _Pick:
    kind: str
    rule: str
    samples: int
    values: int | None = None


def _batch_rule(world_size: int, batch: int, p: NormPolicy, spatial: int | None) -> _Pick:
    if world_size > 1 and p.local_bn_batch is not None and batch >= p.local_bn_batch:
        return _Pick("bn", "local_bn", batch)
    samples = world_size * batch  # what one statistic sees (all ranks combined)
    if samples >= p.min_batch:
        return _Pick("bn", "bn", batch) if world_size == 1 else _Pick("syncbn", "syncbn", samples)
    if p.small_batch != "auto":
        kind, rule, values = p.small_batch, "small_batch", None
    elif spatial is None:
        kind, rule, values = "gn", "values_unknown", None
    else:
        values = samples * spatial
        kind, rule = ("brn" if values >= p.min_values else "gn"), "values"
    if kind == "brn" and world_size > 1:
        kind = "syncbrn"
    return _Pick(kind, rule, samples, values)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sync_group_size(
    world: int, batch: int, p: NormPolicy, local_world_size: int | None = None
) -> tuple[int, str]:
    """(ranks per synchronized group, why) for a run of ``world`` ranks of ``batch``;
    ``local_world_size``: processes per node (None: all in one node)."""
    if p.sync_group == "world":
        return world, "norm.policy.sync_group=world"
    if isinstance(p.sync_group, int):
        if world % p.sync_group:
            raise ValueError(
                f"norm.policy.sync_group={p.sync_group} does not divide world_size {world}; "
                f"valid sizes: {', '.join(map(str, _divisors(world)))}"
            )
        return p.sync_group, f"norm.policy.sync_group={p.sync_group}"
    local = local_world_size or world
    if world % local:
        local = world  # an uneven layout: plan as one node
    need = -(-p.min_batch // batch)  # ranks whose batches reach min_batch
    if need >= world:
        return world, f"all {world} ranks ({world * batch} images)"
    if need <= local:  # one node can: the smallest divisor of a node that does
        size = next(d for d in _divisors(local) if d >= need)
        where = "inside each node" if local < world else "of consecutive ranks"
        return size, f"groups of {size} ranks ({size * batch} images) {where}"
    nodes = world // local  # else whole nodes: the fewest that reach it
    k = next(k for k in _divisors(nodes) if k * local >= need)
    return k * local, f"groups of {k} nodes ({k * local} ranks, {k * local * batch} images)"


def _check_groups(kind: str, part: str, channels: Iterable[int], p: NormPolicy) -> None:
    if kind != "gn" or p.gn_groups is None:
        return
    for c in channels:
        if c % p.gn_groups:
            raise ValueError(
                f"norm.policy.gn_groups={p.gn_groups} does not divide the {c} channels of a "
                f"{part} layer"
            )


def _check_inputs(world_size, per_device_batch, part, spatial, override) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got world_size={world_size!r}")
    if not isinstance(per_device_batch, int) or per_device_batch < 1:
        raise ValueError(
            f"per_device_batch must be an integer >= 1, got per_device_batch={per_device_batch!r}"
        )
    if part not in PARTS:
        raise ValueError(f"unknown part={part!r}; parts are {', '.join(PARTS)}")
    if spatial is not None and (not isinstance(spatial, int) or spatial < 1):
        raise ValueError(f"spatial must be an integer >= 1 or None, got spatial={spatial!r}")
    if override is not None and override not in available_norms():
        raise ValueError(
            f"norm.override.{part}={override!r} is not a norm kind; valid kinds: "
            f"{', '.join(available_norms())}"
        )


def _part_rule(part: str, pick: _Pick, p: NormPolicy, override, pretrained) -> tuple[str, str]:
    """(kind, rule) once the part's own rules are applied over the batch rule's pick."""
    if override is not None:
        return override, "override"
    if part == "backbone" and p.freeze_bn and pretrained:
        return "frozenbn", "freeze_bn"
    if part == "head" and p.head_kind == "gn":
        return "gn", "head_gn"
    if part == "backbone" and pretrained and pick.kind == "gn":
        return "frozenbn", "pretrained"  # GroupNorm cannot reuse the BN weights
    return pick.kind, pick.rule


def select_norm(
    world_size: int,
    per_device_batch: int,
    part: str = "backbone",
    policy: NormPolicy | None = None,
    *,
    override: str | None = None,
    pretrained: bool = False,
    local_world_size: int | None = None,
    device: str = "cpu",
    backend: str | None = None,
    channels: Iterable[int] = (),
    spatial: int | None = None,
) -> NormChoice:
    """The norm for ``part`` of a run with ``world_size`` processes of
    ``per_device_batch`` samples each.

    ``override``: the part's pinned kind (``norm.override.<part>``); ``pretrained``: the
    backbone loads pretrained BN weights; ``local_world_size``: processes per node (sync
    groups stay inside a node when they can); ``device``/``backend`` decide ``impl``;
    ``channels`` (the part's layer widths, when known) let GN group counts be checked;
    ``spatial`` (H x W of the part's smallest normalized feature map, when known) counts
    the values behind each statistic below min_batch.  ``trainer.explain`` words the result."""
    p = policy or NormPolicy()
    _check_inputs(world_size, per_device_batch, part, spatial, override)
    channels = tuple(channels)
    pick = _batch_rule(world_size, per_device_batch, p, spatial)
    kind, rule = _part_rule(part, pick, p, override, pretrained)
    # WS goes with GroupNorm (Qiao et al. 2019): on the head's convs per head_ws, and on
    # a backbone's or neck's convs whenever that part gets GN (gn_ws); an override to GN
    # of a backbone or neck follows gn_ws too.
    ws = kind == "gn" and (p.head_ws if part == "head" else p.gn_ws)
    _check_groups(kind, part, channels, p)
    impl = sync_impl(kind, world_size, device, backend)
    size = 1
    if is_sync_kind(kind) and world_size > 1:
        size, _ = sync_group_size(world_size, per_device_batch, p, local_world_size)
        if size == 1 and override is None:  # each rank's own batch is enough
            kind, impl, rule = "bn", "plain", "local_group"
    return NormChoice(
        part,
        kind,
        ws,
        impl,
        rule,
        size,
        world_size,
        per_device_batch,
        pick.samples,
        spatial,
        pick.values,
        pick.kind,
        channels,
        freeze_ignored=part == "backbone" and p.freeze_bn and not pretrained,
        local_world_size=local_world_size,
    )

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

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from norms.group_norm import choose_groups
from norms.registry import available_norms

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
SYNC_KINDS = ("syncbn", "syncbrn")


@dataclass(frozen=True)
class NormPolicy:
    """The policy's knobs; every threshold is configurable."""

    min_batch: int = 8
    local_bn_batch: int | None = None
    head_kind: str = "gn"  # "gn" or "same" (as the backbone rule)
    head_ws: bool = True
    freeze_bn: bool = False  # frozenbn for a backbone loaded from pretrained weights
    pretrained_backbone: bool = False
    gn_groups: int | None = None  # None: choose_groups(C) per layer
    override: Mapping[str, str | None] = field(default_factory=dict)
    # Ranks per synchronized group: "auto" (the smallest group of consecutive ranks
    # whose combined batch reaches min_batch, inside one node when a node can), "world",
    # or an int dividing world_size.  local_world_size: processes per node (None: all
    # in one node).
    sync_group: str | int = "auto"
    local_world_size: int | None = None
    # Below min_batch: "auto" (Batch Renorm when each statistic has >= min_values values,
    # else GroupNorm), "gn" (GroupNorm, + WS on the part's convs when gn_ws) or "brn"
    # (Batch Renorm; synchronized on several ranks).
    small_batch: str = "auto"
    min_values: int = 8
    gn_ws: bool = True

    def __post_init__(self) -> None:
        if self.min_batch < 1:
            raise ValueError(f"norm.policy.min_batch must be >= 1, got {self.min_batch}")
        if self.local_bn_batch is not None and self.local_bn_batch < 1:
            raise ValueError(
                f"norm.policy.local_bn_batch must be >= 1 or null, got {self.local_bn_batch}"
            )
        if self.head_kind not in ("gn", "same"):
            raise ValueError(
                f"norm.policy.head_kind must be 'gn' or 'same', got {self.head_kind!r}"
            )
        if self.small_batch not in ("auto", "gn", "brn"):
            raise ValueError(
                f"norm.policy.small_batch must be 'auto', 'gn' or 'brn', got {self.small_batch!r}"
            )
        if self.min_values < 1:
            raise ValueError(f"norm.policy.min_values must be >= 1, got {self.min_values}")
        if self.gn_groups is not None and self.gn_groups < 1:
            raise ValueError(f"norm.policy.gn_groups must be >= 1 or null, got {self.gn_groups}")
        if self.sync_group not in ("auto", "world") and not (
            isinstance(self.sync_group, int) and self.sync_group >= 1
        ):
            raise ValueError(
                f"norm.policy.sync_group must be 'auto', 'world' or a positive integer, "
                f"got {self.sync_group!r}"
            )
        for part, kind in self.override.items():
            if part not in PARTS:
                raise ValueError(
                    f"unknown part {part!r} in norm.override; parts are {', '.join(PARTS)}"
                )
            if kind is not None and kind not in available_norms():
                raise ValueError(
                    f"norm.override.{part}={kind!r} is not a norm kind; valid kinds: "
                    f"{', '.join(available_norms())}"
                )


@dataclass(frozen=True)
class NormChoice:
    part: str
    kind: str
    ws: bool
    impl: str  # "plain" | "portable" | "torch-fused"
    reason: str
    sync_group_size: int = 1  # ranks whose batches one statistic covers (1: no sync)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("part")
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
    if kind not in SYNC_KINDS or world_size == 1:
        return "plain"
    _, backend = resolve_device(device, backend or "auto", cuda_available=device == "cuda")
    if kind == "syncbn" and device == "cuda" and backend != "gloo":
        return "torch-fused"
    return "portable"


def _batch_rule(world_size: int, batch: int, p: NormPolicy, spatial: int | None):
    if world_size > 1 and p.local_bn_batch is not None and batch >= p.local_bn_batch:
        return "bn", (
            f"per_device_batch {batch} >= local_bn_batch {p.local_bn_batch}: local BN on "
            f"each of {world_size} ranks, no all-reduce"
        )
    if world_size == 1:
        if batch >= p.min_batch:
            return "bn", f"world_size 1, per_device_batch {batch} >= min_batch {p.min_batch}: BN"
        why = f"world_size 1, per_device_batch {batch} < min_batch {p.min_batch}"
        small, how = _small_batch(batch, spatial, p)
        return small, f"{why}; {how}"
    total = world_size * batch
    if total >= p.min_batch:
        return "syncbn", (
            f"world_size {world_size} x per_device_batch {batch} = {total} >= min_batch "
            f"{p.min_batch}: SyncBN over all ranks"
        )
    why = f"world_size {world_size} x per_device_batch {batch} = {total} < min_batch {p.min_batch}"
    small, how = _small_batch(total, spatial, p, sync=True)
    if small == "brn":
        return "syncbrn", f"{why}; {how}"
    return small, f"{why}, even combined; {how}"


def _small_batch(
    batch: int, spatial: int | None, p: NormPolicy, sync: bool = False
) -> tuple[str, str]:
    """Below min_batch: Batch Renorm or GroupNorm (+ WS), and why, in the table's words.
    ``batch`` is what one statistic sees: the combined batch when ``sync``, and then the
    Batch Renorm named is the synchronized one (the caller maps "brn" to "syncbrn")."""
    gn = f"GroupNorm{' + Weight Standardization' if p.gn_ws else ''}, no batch statistics"
    brn = "synchronized Batch Renorm" if sync else "Batch Renorm"
    if p.small_batch == "brn":
        return "brn", f"{brn} (norm.policy.small_batch=brn)"
    if p.small_batch == "gn":
        return "gn", f"{gn} (norm.policy.small_batch=gn)"
    if spatial is None:
        return "gn", f"{gn} (values per statistic unknown: no feature map size given)"
    values = batch * spatial
    if values >= p.min_values:
        return "brn", (
            f"{batch} x {spatial} = {values} values per statistic at the smallest normalized "
            f"map >= min_values {p.min_values}: {brn}"
        )
    return "gn", (
        f"{batch} x {spatial} = {values} values per statistic at the smallest normalized map "
        f"< min_values {p.min_values}: {gn}"
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sync_group_size(world: int, batch: int, p: NormPolicy) -> tuple[int, str]:
    """(ranks per synchronized group, why) for a run of ``world`` ranks of ``batch``."""
    if p.sync_group == "world":
        return world, "norm.policy.sync_group=world"
    if isinstance(p.sync_group, int):
        if world % p.sync_group:
            raise ValueError(
                f"norm.policy.sync_group={p.sync_group} does not divide world_size {world}; "
                f"valid sizes: {', '.join(map(str, _divisors(world)))}"
            )
        return p.sync_group, f"norm.policy.sync_group={p.sync_group}"
    local = p.local_world_size or world
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


def _describe_groups(channels: Iterable[int], p: NormPolicy) -> str:
    channels = sorted(set(channels))
    if not channels:
        return f"{p.gn_groups} groups" if p.gn_groups else "groups from choose_groups(C)"
    return ", ".join(f"{p.gn_groups or choose_groups(c)} groups of {c} channels" for c in channels)


def _check_groups(kind: str, part: str, channels: Iterable[int], p: NormPolicy) -> None:
    if kind != "gn" or p.gn_groups is None:
        return
    for c in channels:
        if c % p.gn_groups:
            raise ValueError(
                f"norm.policy.gn_groups={p.gn_groups} does not divide the {c} channels of a "
                f"{part} layer"
            )


def select_norm(
    world_size: int,
    per_device_batch: int,
    part: str = "backbone",
    policy: NormPolicy | None = None,
    *,
    device: str = "cpu",
    backend: str | None = None,
    channels: Iterable[int] = (),
    spatial: int | None = None,
) -> NormChoice:
    """The norm for ``part`` of a run with ``world_size`` processes of
    ``per_device_batch`` samples each.  ``device``/``backend`` decide ``impl``;
    ``channels`` (the part's layer widths, when known) let GN group counts be checked;
    ``spatial`` (H x W of the part's smallest normalized feature map, when known) counts
    the values behind each statistic below min_batch."""
    p = policy or NormPolicy()
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
    kind, reason = _batch_rule(world_size, per_device_batch, p, spatial)
    overridden = p.override.get(part)
    if overridden is not None:
        reason = f"override norm.override.{part}={overridden} (the policy would pick {kind})"
        kind = overridden
    elif part == "backbone" and p.freeze_bn and p.pretrained_backbone:
        kind, reason = (
            "frozenbn",
            (
                "backbone loaded from pretrained weights and norm.policy.freeze_bn=true: "
                "FrozenBatchNorm keeps its statistics and affine fixed"
            ),
        )
    elif part == "head" and p.head_kind == "gn":
        kind = "gn"
        reason = (
            f"head: GroupNorm ({_describe_groups(channels, p)})"
            f"{' + Weight Standardization' if p.head_ws else ''}, independent of the batch size "
            f"(norm.policy.head_kind=gn)"
        )
    elif part == "backbone" and p.pretrained_backbone and kind == "gn":
        kind, reason = (
            "frozenbn",
            (
                f"{reason.split(';')[0]}, and the backbone is loaded from pretrained BN "
                "weights that GroupNorm cannot reuse: FrozenBatchNorm keeps their "
                "statistics (what detectron2 and torchvision do for small-batch detection)"
            ),
        )
    elif part == "backbone" and p.freeze_bn:
        reason += " (freeze_bn ignored: the backbone has no pretrained weights)"
    # WS goes with GroupNorm (Qiao et al. 2019): on the head's convs per head_ws, and on
    # a backbone's or neck's convs whenever that part gets GN (gn_ws).
    ws = p.head_ws if part == "head" else (kind == "gn" and p.gn_ws)
    _check_groups(kind, part, channels, p)
    impl = sync_impl(kind, world_size, device, backend)
    size = 1
    if kind in SYNC_KINDS and world_size > 1:
        size, why = sync_group_size(world_size, per_device_batch, p)
        if size == 1 and overridden is None:  # each rank's own batch is enough
            kind, impl = "bn", "plain"
            reason = (
                f"per_device_batch {per_device_batch} >= min_batch {p.min_batch}: local BN "
                f"on each of {world_size} ranks, no synchronization (a group of 1)"
            )
        elif size < world_size or p.sync_group != "auto":
            reason = f"{reason.replace(' over all ranks', '')}; sync in {why}"
    return NormChoice(part, kind, ws, impl, reason, size)

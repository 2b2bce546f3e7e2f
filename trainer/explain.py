"""A policy decision in words: the reason column of the policy table and policy.json.

``norms.select_norm`` decides from numbers and returns them (``NormChoice``); this module
is the one place that turns a decision into text, so wording never feeds back into a
decision.  It lives in the trainer because its words are the run's config keys
(``norm.policy.small_batch=brn``), which the norms library does not know.
"""

from __future__ import annotations

from norms.group_norm import choose_groups
from norms.policy import NormChoice, NormPolicy, sync_group_size
from norms.registry import is_sync_kind

__all__ = ["explain"]


def _gn(p: NormPolicy) -> str:
    return f"GroupNorm{' + Weight Standardization' if p.gn_ws else ''}, no batch statistics"


def _small(c: NormChoice, p: NormPolicy, sync: bool) -> str:
    """Below min_batch: why Batch Renorm or GroupNorm (+ WS)."""
    brn = "synchronized Batch Renorm" if sync else "Batch Renorm"
    if p.small_batch == "brn":
        return f"{brn} (norm.policy.small_batch=brn)"
    if p.small_batch == "gn":
        return f"{_gn(p)} (norm.policy.small_batch=gn)"
    if c.values is None:
        return f"{_gn(p)} (values per statistic unknown: no feature map size given)"
    head = f"{c.samples} x {c.spatial} = {c.values} values per statistic at the smallest normalized"
    if c.values >= p.min_values:
        return f"{head} map >= min_values {p.min_values}: {brn}"
    return f"{head} map < min_values {p.min_values}: {_gn(p)}"


def _batch(c: NormChoice, p: NormPolicy, all_ranks: bool) -> tuple[str, str | None]:
    """The batch rule's reason for ``c.picked``: (why, how), how None when the batch is
    large enough.  ``all_ranks``: SyncBN synchronizes the whole world."""
    world, batch = c.world_size, c.per_device_batch
    if c.rule == "local_bn":
        why = (
            f"per_device_batch {batch} >= local_bn_batch {p.local_bn_batch}: local BN on "
            f"each of {world} ranks, no all-reduce"
        )
        return why, None
    if world == 1:
        if batch >= p.min_batch:
            return f"world_size 1, per_device_batch {batch} >= min_batch {p.min_batch}: BN", None
        why = f"world_size 1, per_device_batch {batch} < min_batch {p.min_batch}"
        return why, _small(c, p, sync=False)
    total = world * batch
    why = f"world_size {world} x per_device_batch {batch} = {total}"
    if total >= p.min_batch:
        where = " over all ranks" if all_ranks else ""
        return f"{why} >= min_batch {p.min_batch}: SyncBN{where}", None
    why = f"{why} < min_batch {p.min_batch}"
    if c.picked != "syncbrn":
        why += ", even combined"
    return why, _small(c, p, sync=True)


def _groups(c: NormChoice, p: NormPolicy) -> str:
    channels = sorted(set(c.channels))
    if not channels:
        return f"{p.gn_groups} groups" if p.gn_groups else "groups from choose_groups(C)"
    return ", ".join(f"{p.gn_groups or choose_groups(n)} groups of {n} channels" for n in channels)


def explain(c: NormChoice, policy: NormPolicy | None = None) -> str:
    """Why ``c`` (from ``select_norm`` with ``policy``) is what it is, in one line."""
    p = policy or NormPolicy()
    if c.rule == "given":
        return "as recorded"
    if c.rule == "local_group":
        return (
            f"per_device_batch {c.per_device_batch} >= min_batch {p.min_batch}: local BN "
            f"on each of {c.world_size} ranks, no synchronization (a group of 1)"
        )
    grouped = (
        is_sync_kind(c.kind)
        and c.world_size > 1
        and (c.sync_group_size < c.world_size or p.sync_group != "auto")
    )
    if c.rule == "override":
        reason = f"override norm.override.{c.part}={c.kind} (the policy would pick {c.picked})"
    elif c.rule == "freeze_bn":
        reason = (
            "backbone loaded from pretrained weights and norm.policy.freeze_bn=true: "
            "FrozenBatchNorm keeps its statistics and affine fixed"
        )
    elif c.rule == "head_gn":
        ws = " + Weight Standardization" if p.head_ws else ""
        reason = (
            f"head: GroupNorm ({_groups(c, p)}){ws}, independent of the batch size "
            f"(norm.policy.head_kind=gn)"
        )
    elif c.rule == "pretrained":
        reason = (
            f"{_batch(c, p, all_ranks=True)[0]}, and the backbone is loaded from pretrained BN "
            "weights that GroupNorm cannot reuse: FrozenBatchNorm keeps their "
            "statistics (what detectron2 and torchvision do for small-batch detection)"
        )
    else:
        why, how = _batch(c, p, all_ranks=not grouped)
        reason = why if how is None else f"{why}; {how}"
        if c.freeze_ignored:
            reason += " (freeze_bn ignored: the backbone has no pretrained weights)"
    if grouped:
        _, where = sync_group_size(c.world_size, c.per_device_batch, p, c.local_world_size)
        reason = f"{reason}; sync in {where}"
    return reason

"""The norm policy applied to a run: one decision per model part, as a table and a record.

The same function serves ``python -m trainer policy`` (planning, any world size, no model
built) and the training run (which saves ``policy_record`` as policy.json), so what the
command prints is what a run with that world size does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from norms import (
    PARTS,
    NormChoice,
    NormPolicy,
    choose_groups,
    learns_running_stats,
    select_norm,
)
from trainer.archs import BACKBONES, HEAD_STRIDE, backbone_of
from trainer.config import Config
from trainer.graphs import GraphPlan, plan_graphs

__all__ = [
    "norm_policy",
    "model_parts",
    "smallest_maps",
    "plan_norms",
    "graph_plan",
    "PreciseBNPlan",
    "precise_bn_plan",
    "policy_record",
    "format_table",
]


def model_parts(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The parts the configured model has, with their norm layers' channel widths."""
    parts = {"backbone": BACKBONES[backbone_of(cfg.model.arch)].widths}
    if cfg.model.task == "detection":
        parts["neck"] = (cfg.model.fpn_channels,)
        parts["head"] = (cfg.model.fpn_channels,)
    return parts


def smallest_maps(cfg: Config) -> dict[str, int]:
    """H x W of each part's smallest normalized feature map for data.image_size inputs:
    the policy counts the values behind a statistic there (batch x H x W)."""
    stride = BACKBONES[backbone_of(cfg.model.arch)].stride
    side = -(-cfg.data.image_size // stride)
    maps = {"backbone": side * side}
    if cfg.model.task == "detection":
        maps["neck"] = side * side  # P5
        head = -(-cfg.data.image_size // HEAD_STRIDE)
        maps["head"] = head * head  # P7
    return maps


def norm_policy(cfg: Config, local_world_size: int | None = None) -> NormPolicy:
    p = cfg.norm.policy
    return NormPolicy(
        sync_group=p.sync_group,
        local_world_size=local_world_size,
        min_batch=p.min_batch,
        local_bn_batch=p.local_bn_batch,
        head_kind=p.head_kind,
        head_ws=p.head_ws,
        small_batch=p.small_batch,
        min_values=p.min_values,
        gn_ws=p.gn_ws,
        freeze_bn=p.freeze_bn,
        pretrained_backbone=cfg.model.backbone_weights is not None,
        gn_groups=p.gn_groups,
        override={part: getattr(cfg.norm.override, part) for part in PARTS},
    )


def plan_norms(
    cfg: Config,
    world_size: int,
    device: str,
    backend: str,
    local_world_size: int | None = None,
) -> dict[str, NormChoice]:
    """One decision per part; ``local_world_size`` (processes per node) keeps sync
    groups inside a node (None: the whole world is one node)."""
    policy = norm_policy(cfg, local_world_size)
    maps = smallest_maps(cfg)
    plan = {
        part: select_norm(
            world_size,
            cfg.train.per_device_batch,
            part,
            policy,
            device=device,
            backend=backend,
            channels=widths,
            spatial=maps[part],
        )
        for part, widths in model_parts(cfg).items()
    }
    _check_gn_values(cfg, plan, policy, maps)
    return plan


def _check_gn_values(
    cfg: Config, plan: dict[str, NormChoice], policy: NormPolicy, maps: dict[str, int]
) -> None:
    """GroupNorm needs 2+ values per group: with 1 channel per group on a 1x1 map it
    raises on a single image and, on more, silently outputs its bias (x - mean = 0).
    Checked for the FPN parts, whose norm layers all have fpn_channels and all see the
    part's smallest map (a backbone's widths and maps differ layer by layer)."""
    c = cfg.model.fpn_channels
    for part in ("neck", "head"):
        if part not in plan or plan[part].kind != "gn":
            continue
        groups = policy.gn_groups or choose_groups(c)
        if c // groups * maps[part] < 2:
            raise ValueError(
                f"model.fpn_channels={c}: the {part}'s GroupNorm ({groups} groups) has "
                f"{c // groups} channel x {maps[part]} position = 1 value per group at its "
                f"smallest map (data.image_size={cfg.data.image_size}), which GroupNorm "
                f"cannot normalize; use model.fpn_channels >= {2 * groups}, "
                f"norm.policy.gn_groups <= {c // 2}, or larger images"
            )


def graph_plan(cfg: Config, world_size: int, device: str) -> GraphPlan:
    """Whether this run captures CUDA graphs (``train.cuda_graphs``), and why."""
    t = cfg.train
    return plan_graphs(
        t.cuda_graphs,
        device=device,
        world_size=world_size,
        compile=t.compile,
        amp=t.amp,
        grad_accum=t.grad_accum,
    )


@dataclass(frozen=True)
class PreciseBNPlan:
    enabled: bool
    num_batches: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def precise_bn_plan(cfg: Config, plan: dict[str, NormChoice]) -> PreciseBNPlan:
    """Whether running statistics are recalibrated before every eval and save, and why."""
    p, batch, min_batch = cfg.norm.precise_bn, cfg.train.per_device_batch, cfg.norm.policy.min_batch
    parts = [part for part, c in plan.items() if learns_running_stats(c.kind)]
    if p.enabled == "false":
        return PreciseBNPlan(False, p.num_batches, "norm.precise_bn.enabled=false")
    if not parts:
        return PreciseBNPlan(False, p.num_batches, f"{p.enabled}: no part learns running stats")
    if p.enabled == "true":
        return PreciseBNPlan(True, p.num_batches, "norm.precise_bn.enabled=true")
    if batch >= min_batch:
        return PreciseBNPlan(
            False, p.num_batches, f"auto: per_device_batch {batch} >= min_batch {min_batch}"
        )
    return PreciseBNPlan(
        True,
        p.num_batches,
        f"auto: {'/'.join(parts)} learn running statistics at per_device_batch {batch} < "
        f"min_batch {min_batch}",
    )


def policy_record(
    cfg: Config,
    world_size: int,
    plan: dict[str, NormChoice],
    graphs: GraphPlan,
    precise: PreciseBNPlan,
) -> dict:
    """What policy.json holds."""
    return {
        "world_size": world_size,
        "per_device_batch": cfg.train.per_device_batch,
        "parts": {part: choice.as_dict() for part, choice in plan.items()},
        "precise_bn": precise.as_dict(),
        "cuda_graphs": graphs.as_dict(),
    }


def format_table(
    plan: dict[str, NormChoice],
    graphs: GraphPlan | None = None,
    precise: PreciseBNPlan | None = None,
) -> str:
    rows = [("part", "kind", "ws", "impl", "group", "reason")]
    rows += [
        (c.part, c.kind, "yes" if c.ws else "no", c.impl, str(c.sync_group_size), c.reason)
        for c in plan.values()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(v.ljust(w) for v, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    if precise is not None or graphs is not None:
        lines.append("")
    if precise is not None:
        state = f"on, {precise.num_batches} batches" if precise.enabled else "off"
        lines.append(f"precise BN: {state} ({precise.reason})")
    if graphs is not None:
        lines.append(f"cuda graphs: {'on' if graphs.enabled else 'off'} ({graphs.reason})")
    return "\n".join(lines)

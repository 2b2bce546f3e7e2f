"""The norm policy applied to a run: one decision per model part, as a table and a record.

The same function serves ``python -m trainer policy`` (planning, any world size, no model
built) and the training run (which saves ``policy_record`` as policy.json), so what the
command prints is what a run with that world size does.
"""

from __future__ import annotations

from norms import PARTS, NormChoice, NormPolicy, select_norm
from trainer.archs import BACKBONES, backbone_of
from trainer.config import Config
from trainer.graphs import GraphPlan, plan_graphs

__all__ = [
    "norm_policy",
    "model_parts",
    "plan_norms",
    "graph_plan",
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


def norm_policy(cfg: Config) -> NormPolicy:
    p = cfg.norm.policy
    return NormPolicy(
        min_batch=p.min_batch,
        local_bn_batch=p.local_bn_batch,
        head_kind=p.head_kind,
        head_ws=p.head_ws,
        freeze_bn=p.freeze_bn,
        pretrained_backbone=cfg.model.backbone_weights is not None,
        gn_groups=p.gn_groups,
        override={part: getattr(cfg.norm.override, part) for part in PARTS},
    )


def plan_norms(cfg: Config, world_size: int, device: str, backend: str) -> dict[str, NormChoice]:
    policy = norm_policy(cfg)
    return {
        part: select_norm(
            world_size,
            cfg.train.per_device_batch,
            part,
            policy,
            device=device,
            backend=backend,
            channels=widths,
        )
        for part, widths in model_parts(cfg).items()
    }


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


def policy_record(
    cfg: Config, world_size: int, plan: dict[str, NormChoice], graphs: GraphPlan
) -> dict:
    """What policy.json holds."""
    return {
        "world_size": world_size,
        "per_device_batch": cfg.train.per_device_batch,
        "parts": {part: choice.as_dict() for part, choice in plan.items()},
        "cuda_graphs": graphs.as_dict(),
    }


def format_table(plan: dict[str, NormChoice], graphs: GraphPlan | None = None) -> str:
    rows = [("part", "kind", "ws", "impl", "reason")]
    rows += [(c.part, c.kind, "yes" if c.ws else "no", c.impl, c.reason) for c in plan.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    if graphs is not None:
        lines.append(f"\ncuda graphs: {'on' if graphs.enabled else 'off'} ({graphs.reason})")
    return "\n".join(lines)

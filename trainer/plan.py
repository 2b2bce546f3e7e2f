"""The run plan: everything decided about a run before anything is built, in one place.

``plan_run(cfg, world_size, device, backend, local_world_size)`` settles, once per start:
the batch numbers (per device, global, eval), the norm decision per model part, whether
precise BN recalibrates, whether CUDA graphs are captured, and why each.  The CLI's
pre-check, ``train()``, ``python -m trainer policy``, the benches and the cost model all
read a ``RunPlan``; nothing downstream reads ``train.per_device_batch`` or re-derives a
decision.  The same function serves planning (any world size, no model built) and the
run (which saves ``RunPlan.record()`` as policy.json), so what ``policy`` prints is what
a run with that world size does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from norms import (
    NormChoice,
    NormPolicy,
    choose_groups,
    learns_running_stats,
    select_norm,
)
from trainer.archs import BACKBONES, HEAD_STRIDE, backbone_of
from trainer.canvas import canvases
from trainer.config import Config
from trainer.data import dataset_root, train_aspects
from trainer.explain import explain
from trainer.graphs import GraphPlan, plan_graphs
from trainer.sizing import UNKNOWN_ASPECTS

__all__ = [
    "Batches",
    "eval_batch",
    "PreciseBNPlan",
    "RunPlan",
    "model_parts",
    "plan_run",
    "smallest_map_sizes",
]


def eval_batch(per_device_batch: int) -> int:
    """Eval batches: at least 8 images (eval has no norm statistics to protect, only
    speed), the training batch when larger."""
    return max(8, per_device_batch)


@dataclass(frozen=True)
class Batches:
    """The batch numbers, settled once: ``per_device`` is one forward pass of one
    process (what a norm layer sees), ``global_`` one optimizer step of the run."""

    per_device: int
    grad_accum: int
    world_size: int

    @property
    def global_(self) -> int:
        return self.per_device * self.world_size * self.grad_accum

    @property
    def eval(self) -> int:
        return eval_batch(self.per_device)


def model_parts(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The parts the configured model has, with their norm layers' channel widths."""
    parts = {"backbone": BACKBONES[backbone_of(cfg.model.arch)].widths}
    if cfg.model.task == "detection":
        parts["neck"] = (cfg.model.fpn_channels,)
        parts["head"] = (cfg.model.fpn_channels,)
    return parts


def smallest_map_sizes(cfg: Config, aspects: tuple[float, ...]) -> dict[str, tuple[int, int]]:
    """(H, W) of each part's smallest normalized feature map: the policy counts the values
    behind a statistic there (batch x H x W).  A classifier sees data.image_size squares;
    a detector the training sizes (data.min_size / max_size), at the long/short
    ``aspects`` its training images can have (trainer.sizing)."""
    stride = BACKBONES[backbone_of(cfg.model.arch)].stride
    if cfg.model.task != "detection":
        side = -(-cfg.data.image_size // stride)
        return {"backbone": (side, side)}
    sizing = cfg.data.sizing()
    last = sizing.smallest_map(stride, aspects)
    # the body's last stage and the FPN's P5 share a stride; the head's smallest is P7
    return {"backbone": last, "neck": last, "head": sizing.smallest_map(HEAD_STRIDE, aspects)}


def _plan_parts(cfg, world_size: int, device: str, backend: str, local: int | None, sizes, where):
    """One decision per part; ``sizes``: part -> (H, W) of its smallest map, ``where``
    the sizing they come from (for messages)."""
    policy, maps = cfg.norm.policy, {part: h * w for part, (h, w) in sizes.items()}
    parts = {
        part: select_norm(
            world_size,
            cfg.train.per_device_batch,
            part,
            policy,
            override=getattr(cfg.norm.override, part),
            pretrained=cfg.model.backbone_weights is not None,
            local_world_size=local,
            device=device,
            backend=backend,
            channels=widths,
            spatial=maps[part],
        )
        for part, widths in model_parts(cfg).items()
    }
    _check_gn_values(cfg, parts, policy, maps, where)
    return parts


def _check_gn_values(
    cfg: Config, plan: dict[str, NormChoice], policy: NormPolicy, maps: dict[str, int], where: str
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
                f"smallest map ({where}), which GroupNorm cannot normalize; use "
                f"model.fpn_channels >= {2 * groups}, norm.policy.gn_groups <= {c // 2}, or "
                f"larger images"
            )


def _varying_shapes(cfg: Config, known: tuple[float, ...] | None) -> str | None:
    """Why a detector's training batches have more than one padded shape (None: one)."""
    if cfg.model.task != "detection":
        return None
    sizes = cfg.data.sizing().min_size
    if len(sizes) > 1:
        return f"data.min_size={list(sizes)} (multi-scale)"
    if known is None or len(known) > 1:
        return "images of several aspect ratios" if known else "aspect ratios not known"
    return None


def _sizes_text(cfg: Config, known: tuple[float, ...] | None = None) -> str:
    if cfg.model.task != "detection":
        return f"data.image_size={cfg.data.image_size}"
    d = cfg.data
    if known == (1.0,):
        shapes = "square images"
    elif known:
        shapes = f"aspect ratios {known[0]:g} to {known[-1]:g} in the training data"
    else:
        shapes = "aspect ratios up to 2:1 assumed (no annotation file read)"
    return f"data.min_size={d.min_size}, data.max_size={d.max_size}; {shapes}"


@dataclass(frozen=True)
class PreciseBNPlan:
    enabled: bool
    num_batches: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _precise_bn(cfg: Config, parts: dict[str, NormChoice]) -> PreciseBNPlan:
    """Whether running statistics are recalibrated before every eval and save, and why."""
    p, batch, min_batch = cfg.norm.precise_bn, cfg.train.per_device_batch, cfg.norm.policy.min_batch
    learning = [part for part, c in parts.items() if learns_running_stats(c.kind)]
    if p.enabled == "false":
        return PreciseBNPlan(False, p.num_batches, "norm.precise_bn.enabled=false")
    if not learning:
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
        f"auto: {'/'.join(learning)} learn running statistics at per_device_batch {batch} < "
        f"min_batch {min_batch}",
    )


@dataclass(frozen=True)
class RunPlan:
    """What ``plan_run`` settled for one start of a run."""

    world_size: int
    local_world_size: int
    device: str
    backend: str
    batch: Batches
    parts: dict[str, NormChoice]
    precise: PreciseBNPlan
    graphs: GraphPlan
    policy: NormPolicy
    maps: dict[str, tuple[int, int]]  # part -> (H, W) the policy counted values on
    sizes: str  # where those maps come from, in the config's words

    def reason(self, part: str) -> str:
        return explain(self.parts[part], self.policy)

    def record(self) -> dict:
        """What policy.json holds (and ``policy --json`` prints)."""
        return {
            "world_size": self.world_size,
            "per_device_batch": self.batch.per_device,
            "parts": {
                part: {**c.as_dict(), "reason": self.reason(part)} for part, c in self.parts.items()
            },
            "precise_bn": self.precise.as_dict(),
            "cuda_graphs": self.graphs.as_dict(),
            "smallest_maps": {part: list(hw) for part, hw in self.maps.items()},
        }

    def table(self) -> str:
        rows = [(c, self.reason(part)) for part, c in self.parts.items()]
        maps = ", ".join(f"{part} {h}x{w}" for part, (h, w) in self.maps.items())
        return (
            format_table(rows, self.graphs, self.precise)
            + f"\nsmallest normalized maps: {maps} ({self.sizes})"
        )


def plan_run(
    cfg: Config,
    world_size: int,
    device: str,
    backend: str = "gloo",
    local_world_size: int | None = None,
) -> RunPlan:
    """The plan for ``world_size`` processes on ``device``/``backend``;
    ``local_world_size`` (processes per node) keeps sync groups inside a node (None: the
    whole world is one node).  Raises ValueError/ConfigError when the run is impossible."""
    t, d = cfg.train, cfg.data
    folder = dataset_root(
        d.dataset, d.root, cfg.model.task, d.image_size, d.num_train, d.num_val, cfg.run.seed
    )
    known = train_aspects(d.dataset, folder) if cfg.model.task == "detection" else None
    varying = _varying_shapes(cfg, known)
    graphs = plan_graphs(
        t.cuda_graphs,
        device=device,
        world_size=world_size,
        compile=t.compile,
        amp=t.amp,
        grad_accum=t.grad_accum,
        varying_shapes=varying,
        # grouped batches (known sizes) fit the orientation canvases; unknown sizes don't
        canvases=tuple(canvases(d.sizing())) if varying and known else (),
    )
    maps = smallest_map_sizes(cfg, known or UNKNOWN_ASPECTS)
    where = _sizes_text(cfg, known)
    parts = _plan_parts(cfg, world_size, device, backend, local_world_size, maps, where)
    return RunPlan(
        world_size=world_size,
        local_world_size=local_world_size or world_size,
        device=device,
        backend=backend,
        batch=Batches(t.per_device_batch, t.grad_accum, world_size),
        parts=parts,
        precise=_precise_bn(cfg, parts),
        graphs=graphs,
        policy=cfg.norm.policy,
        maps=maps,
        sizes=where,
    )


def format_table(
    rows_in: list[tuple[NormChoice, str]],
    graphs: GraphPlan | None = None,
    precise: PreciseBNPlan | None = None,
) -> str:
    rows = [("part", "kind", "ws", "impl", "group", "reason")]
    rows += [
        (c.part, c.kind, "yes" if c.ws else "no", c.impl, str(c.sync_group_size), reason)
        for c, reason in rows_in
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

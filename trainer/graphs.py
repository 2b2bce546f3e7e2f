"""CUDA graphs for the static part of a training step.

At 1-4 images per GPU an eager step is bound by the CPU dispatching kernels, not by the
GPU (measured on an H100: a ResNet-50 BN step takes ~22 ms eager at batch 4 and 4.9 ms
replayed from a graph).  ``torch.cuda.make_graphed_callables`` captures the forward and
the backward of the static part once and replays them every step:

* classification: the whole model;
* detection: backbone + FPN + head on the padded batch.  torchvision's transform,
  anchors, loss matching and post-processing stay eager (data-dependent shapes).

The optimizer step stays eager.  Batch Renorm's clip-limit ramp and step count are
device tensors updated inside the graph (``norms.batch_renorm``), so they keep advancing
on replay.  ``plan_graphs`` decides (auto: on for a single CUDA process); ``capture``
does it in place: parameters, buffers and state_dict
keys are unchanged, eval mode and any batch of another shape run the original eager
forward, and ``GraphCounts`` (``model.graph_counts``) counts replayed and eager steps
for the log.

A graph holds one input shape.  Detection batches of mixed sizes (multi-scale training,
images of several aspect ratios) are padded to one of a few fixed canvases
(``trainer.canvas``: one per orientation of the aspect-ratio grouped sampler), with one
graph per canvas in a shared memory pool.  On a canvas every norm takes its statistics
over the batch's own padded region and the rest stays zero (``norms.region``), so the
features and head outputs cropped back are those of the batch alone: the graphs change
no statistic.  A batch that fits no canvas runs eagerly and is counted.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from norms.region import Padding, Region, mask_padding
from trainer.canvas import crop, fit, pad_to

__all__ = [
    "GraphCounts",
    "GraphPlan",
    "canvas_parts",
    "capture",
    "plan_graphs",
    "route_to_canvases",
]


@dataclass
class GraphCounts:
    """Training forwards of a graphed model: replayed from the graph, or run eagerly
    because the batch had another shape."""

    replayed: int = 0
    eager: int = 0

    def as_dict(self) -> dict:
        return {"graph_replays": self.replayed, "graph_eager": self.eager}


@dataclass(frozen=True)
class GraphPlan:
    enabled: bool
    reason: str
    # a detector's (H, W) canvases; empty: one graph at the first batch's shape
    canvases: tuple[tuple[int, int], ...] = ()

    def as_dict(self) -> dict:
        out = {"enabled": self.enabled, "reason": self.reason}
        return {**out, "canvases": [list(c) for c in self.canvases]} if self.canvases else out


def plan_graphs(
    setting: str,
    *,
    device: str,
    world_size: int,
    compile: bool,
    amp: str,
    grad_accum: int,
    varying_shapes: str | None = None,
    canvases: tuple[tuple[int, int], ...] = (),
) -> GraphPlan:
    """Whether ``train.cuda_graphs`` = auto|true|false captures, and why.

    ``true`` where capture is impossible (CPU) is a ConfigError; where it is unsafe here
    (several processes: DDP's all-reduce and SyncBN's collectives would have to follow
    NCCL's capture rules; torch.compile, which has its own graphs; fp16's GradScaler, whose
    skipped steps replay badly; gradient accumulation) it falls back with the reason.
    Batches of ``varying_shapes`` are graphed on ``canvases`` when there are any; with
    none (the sizes cannot be grouped onto canvases) they run eagerly.
    """
    from trainer.config import ConfigError

    if setting == "false":
        return GraphPlan(False, "train.cuda_graphs=false")
    if device != "cuda":
        if setting == "true":
            raise ConfigError(
                f"train.cuda_graphs=true needs a CUDA device, this run is on {device}"
            )
        return GraphPlan(False, f"auto: off on {device} (CUDA graphs need a GPU)")
    blockers = [
        (world_size > 1, f"world_size {world_size} (DDP/SyncBN collectives are not captured)"),
        (compile, "train.compile=true (torch.compile manages its own graphs)"),
        (amp == "fp16", "train.amp=fp16 (GradScaler's skipped steps)"),
        (grad_accum > 1, f"train.grad_accum={grad_accum}"),
        (
            varying_shapes is not None and not canvases,
            f"{varying_shapes} (no canvases to pad them to)",
        ),
    ]
    why = [text for blocked, text in blockers if blocked]
    if why:
        return GraphPlan(False, f"{setting}: eager because of " + "; ".join(why))
    if varying_shapes is None:
        return GraphPlan(True, f"{setting}: forward+backward of the static part captured")
    shapes = ", ".join(f"{h}x{w}" for h, w in canvases)
    return GraphPlan(
        True,
        f"{setting}: forward+backward of the static part captured, one graph per canvas "
        f"({shapes}) for {varying_shapes}; norms count each batch's own region",
        tuple(canvases),
    )


def capture(
    model: nn.Module, task: str, sample: torch.Tensor, amp_dtype=None, canvases=()
) -> str | None:
    """Graph the static part of ``model`` in place for inputs shaped like ``sample``
    (classification: the image batch; detection: the transform's padded batch, or
    batches of ``sample``'s size padded to each of ``canvases``).

    Returns None, or why the capture failed (out of memory, an op that cannot be
    captured): the model is then left as it was, eager, with its state restored, so a
    run that would have trained eagerly still trains."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    autocast = torch.autocast(
        "cuda",
        dtype=amp_dtype or torch.float32,
        enabled=amp_dtype is not None,
        cache_enabled=False,  # required with graphs: the cast cache would be captured
    )
    failed = None
    try:
        with autocast:
            if task == "detection":
                _capture_detector(model, sample, list(canvases) or [tuple(sample.shape[-2:])])
            else:
                _capture_classifier(model, sample)
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
        failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        _uncapture(model)
    # The warm-up iterations ran real forwards: they moved BN running statistics and
    # step counts.  Put every tensor back in place (same storage: the graph keeps it).
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved[k])
    return failed


def _uncapture(model: nn.Module) -> None:
    """Remove what a capture put on the model: the instance forwards (the class's own
    run again) and the counters."""
    for module in (model, getattr(model, "backbone", None), getattr(model, "head", None)):
        if module is not None and "forward" in vars(module):
            del module.forward
    if "graph_counts" in vars(model):
        del model.graph_counts
    undo = vars(model).pop("_unmask_padding", None)
    if undo is not None:
        undo()


def _other_shape(x: torch.Tensor, shape: tuple, warned: list) -> bool:
    """Whether ``x`` is not the captured shape (then it runs eagerly); warns once."""
    if tuple(x.shape) == shape:
        return False
    if not warned:
        warned.append(True)
        warnings.warn(
            f"CUDA graph captured for batches of {shape}, got {tuple(x.shape)}: "
            "this batch runs eagerly",
            stacklevel=3,
        )
    return True


def _capture_classifier(model: nn.Module, sample: torch.Tensor) -> None:
    eager = model.forward  # the class's forward, bound
    torch.cuda.make_graphed_callables(model, (sample,))
    graphed = model.forward  # replays in training mode, runs ``eager`` in eval
    shape = tuple(sample.shape)
    counts = model.graph_counts = GraphCounts()
    warned = []

    def forward(x):
        # torch's graphed forward copies any input into the static one: a batch of 1
        # into a graph of 4 would broadcast silently.  Another shape runs eagerly.
        if model.training and _other_shape(x, shape, warned):
            counts.eager += 1
            return eager(x)
        counts.replayed += model.training
        return graphed(x)

    model.forward = forward


class _StaticPart(nn.Module):
    """Backbone + FPN + head on a padded batch, returning a flat tuple of tensors; on a
    canvas, with the norms counting ``region`` only."""

    def __init__(self, backbone_fwd, head_fwd, padding: Padding, region: Region):
        super().__init__()
        self.backbone_fwd, self.head_fwd = backbone_fwd, head_fwd
        self.padding, self.region = padding, region
        self.feature_names: list[str] = []
        self.head_keys: list[str] = []

    def forward(self, x):
        # Each forward (the graph's capture included) computes the masks afresh from the
        # region's extent tensor, so a replay reads the extent copied in before it.
        with self.padding.on(self.region):
            features = self.backbone_fwd(x)
            head = self.head_fwd(list(features.values()))
        self.feature_names, self.head_keys = list(features), list(head)
        return (*features.values(), *head.values())


def _capture_detector(model: nn.Module, sample: torch.Tensor, canvases: list) -> None:
    statics = canvas_parts(model, canvases, sample.device)
    # one memory pool for all canvases: one canvas's graph runs per step, and nothing a
    # graph wrote outlives its step (gradients are set to None after each)
    pool = torch.cuda.graph_pool_handle() if len(statics) > 1 else None
    for canvas, static in statics.items():
        example = sample.new_zeros(sample.shape[0], sample.shape[1], *canvas)
        torch.cuda.make_graphed_callables(static, (example,), pool=pool)
    route_to_canvases(model, statics, sample.shape[0])


def canvas_parts(model: nn.Module, canvases: list, device) -> dict:
    """One static part per canvas, over ``model``'s own layers, which are prepared to
    count a canvas's region only (``norms.region``; undone by ``_uncapture``)."""
    backbone, head = model.backbone, model.head
    padding = Padding()
    model._unmask_padding = mask_padding(nn.ModuleList([backbone, head]), padding)
    statics = {}
    for canvas in canvases:
        static = _StaticPart(backbone.forward, head.forward, padding, Region(canvas, device))
        # The static part's parameters are the model's (registered here too, so that
        # the graph differentiates with respect to them).
        static.parts = nn.ModuleList([backbone, head])
        static.training = model.training
        statics[tuple(canvas)] = static
    return statics


def route_to_canvases(model: nn.Module, statics: dict, batch: int) -> None:
    """Send each training batch of ``batch`` images through the static part of the
    smallest canvas that holds it (graphed: a replay), cropping its outputs back; other
    batches, and eval, run the eager forwards."""
    backbone, head = model.backbone, model.head
    eager_backbone, eager_head = backbone.forward, head.forward  # bound class methods
    stash: dict = {}
    warned = []
    counts = model.graph_counts = GraphCounts()
    largest = max(statics, key=lambda c: c[0] * c[1])

    def backbone_forward(x):
        # Graphs replay in training mode only; eval runs eagerly.  Only the wrappers'
        # own flags are set: train() would recurse and overwrite the layers' modes
        # (precise BN runs the model in eval with its BN layers in train).
        stash.clear()
        if not backbone.training:
            return eager_backbone(x)
        hw = tuple(x.shape[-2:])
        canvas = fit(hw, list(statics)) if x.shape[0] == batch else None
        if canvas is None:
            _other_shape(x, (batch, x.shape[1], *largest), warned)
            counts.eager += 1
            return eager_backbone(x)
        static = statics[canvas]
        static.training = True
        static.region.set(*hw)
        out = static(pad_to(x, canvas))
        n = len(static.feature_names)
        head_out = OrderedDict(zip(static.head_keys, out[n:], strict=True))
        features, stash["head"] = crop(list(out[:n]), head_out, canvas, hw)
        counts.replayed += 1
        return OrderedDict(zip(static.feature_names, features, strict=True))

    def head_forward(features):
        if "head" in stash:
            return stash.pop("head")  # computed in the graph with the features
        return eager_head(features)

    # Instance attributes: state_dict keys and the module tree stay as they were.
    backbone.forward, head.forward = backbone_forward, head_forward

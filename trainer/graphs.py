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
on replay.  ``plan_graphs`` decides (auto: on for a single CUDA process whose batches
all have one shape); ``capture`` does it in place: parameters, buffers and state_dict
keys are unchanged, eval mode and any batch of another shape run the original eager
forward, and ``GraphCounts`` (``model.graph_counts``) counts replayed and eager steps
for the log.

A graph holds one input shape.  Detection batches of mixed sizes (multi-scale training,
or images of several aspect ratios) have many padded shapes; padding them all to a few
fixed canvases would change the statistics every norm computes (BatchNorm's over the
batch, GroupNorm's per image: both count the padded zeros), so ``auto`` runs such a
detector eagerly and says why, rather than capturing a shape most steps miss.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GraphCounts", "GraphPlan", "plan_graphs", "capture"]


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

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "reason": self.reason}


def plan_graphs(
    setting: str,
    *,
    device: str,
    world_size: int,
    compile: bool,
    amp: str,
    grad_accum: int,
    varying_shapes: str | None = None,
) -> GraphPlan:
    """Whether ``train.cuda_graphs`` = auto|true|false captures, and why.

    ``true`` where capture is impossible (CPU) is a ConfigError; where it is unsafe here
    (several processes: DDP's all-reduce and SyncBN's collectives would have to follow
    NCCL's capture rules; torch.compile, which has its own graphs; fp16's GradScaler, whose
    skipped steps replay badly; gradient accumulation) it falls back with the reason.
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
        (varying_shapes is not None, f"{varying_shapes} (one graph holds one shape)"),
    ]
    why = [text for blocked, text in blockers if blocked]
    if why:
        return GraphPlan(False, f"{setting}: eager because of " + "; ".join(why))
    return GraphPlan(True, f"{setting}: forward+backward of the static part captured")


def capture(model: nn.Module, task: str, sample: torch.Tensor, amp_dtype=None) -> str | None:
    """Graph the static part of ``model`` in place for inputs shaped like ``sample``
    (classification: the image batch; detection: the transform's padded batch).

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
                _capture_detector(model, sample)
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
    """Backbone + FPN + head on a padded batch, returning a flat tuple of tensors."""

    def __init__(self, backbone_fwd, head_fwd):
        super().__init__()
        self.backbone_fwd, self.head_fwd = backbone_fwd, head_fwd
        self.feature_names: list[str] = []
        self.head_keys: list[str] = []

    def forward(self, x):
        features = self.backbone_fwd(x)
        head = self.head_fwd(list(features.values()))
        self.feature_names, self.head_keys = list(features), list(head)
        return (*features.values(), *head.values())


def _capture_detector(model: nn.Module, sample: torch.Tensor) -> None:
    backbone, head = model.backbone, model.head
    eager_backbone, eager_head = backbone.forward, head.forward  # bound class methods
    static = _StaticPart(eager_backbone, eager_head)
    # The static part's parameters are the model's (registered here too, so that the
    # graph differentiates with respect to them).
    static.parts = nn.ModuleList([backbone, head])
    static.training = model.training
    torch.cuda.make_graphed_callables(static, (sample,))
    shape = tuple(sample.shape)
    stash: dict = {}
    warned = []
    counts = model.graph_counts = GraphCounts()

    def backbone_forward(x):
        # The graph replays in training mode only; eval runs eagerly.  Only the wrapper's
        # own flag is set: train() would recurse and overwrite the layers' modes (precise
        # BN runs the model in eval with its BN layers in train).
        static.training = backbone.training
        if backbone.training and _other_shape(x, shape, warned):
            stash.clear()
            counts.eager += 1
            return eager_backbone(x)
        counts.replayed += backbone.training
        out = static(x)
        n = len(static.feature_names)
        stash["head"] = OrderedDict(zip(static.head_keys, out[n:], strict=True))
        return OrderedDict(zip(static.feature_names, out[:n], strict=True))

    def head_forward(features):
        if "head" in stash:
            return stash.pop("head")  # computed in the graph with the features
        return eager_head(features)

    # Instance attributes: state_dict keys and the module tree stay as they were.
    backbone.forward, head.forward = backbone_forward, head_forward

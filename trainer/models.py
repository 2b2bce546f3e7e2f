"""torchvision models with the norms the policy chose for each part.

* classification: a torchvision ResNet; its BN layers are the ``backbone`` part.
* detection: FCOS or RetinaNet on a ResNet + FPN.  ``backbone`` = the ResNet body,
  ``neck`` = the FPN (torchvision builds it without norms; we give it the policy's), and
  ``head`` = the detection head's conv towers (torchvision uses GroupNorm(32) there).

A part's convs that feed its norm layers are weight-standardized when the policy says ws
(GroupNorm + WS, Qiao et al. 2019): the head's towers, and the ResNet body's and the FPN's
convs when those parts get GroupNorm.  The FPN's P6/P7 convs feed no norm and stay plain.

Pretrained weights load only from a local path (``model.backbone_weights``); nothing is
downloaded.  Model building takes plain arguments, not the config object.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from norms import (
    NormChoice,
    build_norm,
    convert_convs_to_ws,
    convert_norms,
    is_renorm_kind,
    is_sync_kind,
    learns_running_stats,
)
from norms.per_level import PerLevelNorm, per_level_norms
from trainer.archs import BACKBONES, backbone_of
from trainer.sizing import Sizing

__all__ = ["build_model", "norm_kwargs", "ModelError"]


class ModelError(ValueError):
    pass


def norm_kwargs(kind: str, brn: dict, group=None, gn_groups: int | None = None) -> dict:
    """Constructor keywords for ``kind``: Batch Renorm's settings, the process group a
    synchronized kind reduces over (None: every rank), GroupNorm's group count (None:
    ``choose_groups`` per layer)."""
    kw = dict(brn) if is_renorm_kind(kind) else {}
    if group is not None and is_sync_kind(kind):
        kw["process_group"] = group
    if kind == "gn" and gn_groups is not None:
        kw["num_groups"] = gn_groups
    return kw


def _resnet_body(arch: str, weights: str | None, num_classes: int = 1000) -> nn.Module:
    name = backbone_of(arch)
    body = getattr(resnet, name)(weights=None, num_classes=num_classes)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"model.backbone_weights: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ModelError(f"model.backbone_weights: cannot load {path}: {e}") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        if num_classes != 1000:  # the classifier's own fc has another shape: skip it
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ModelError(
                f"model.backbone_weights: {path} does not fit {name} "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
    return body


class _FCOSHead(FCOSHead):
    """torchvision's FCOSHead with a norm_layer: its own constructor hard-codes
    GroupNorm(32, C), which fails for C not divisible by 32 (its sub-heads do take one)."""

    def __init__(self, in_channels: int, num_classes: int, norm_layer) -> None:
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(
            in_channels, 1, num_classes, norm_layer=norm_layer
        )
        self.regression_head = FCOSRegressionHead(in_channels, 1, norm_layer=norm_layer)


def build_model(
    arch: str,
    num_classes: int,
    plan: dict[str, NormChoice],
    *,
    image_size: int | None = None,
    sizing: Sizing | None = None,
    anchor_sizes: list[int] | None = None,
    fpn_channels: int = 64,
    backbone_weights: str | None = None,
    brn: dict | None = None,
    groups: dict | None = None,
    gn_groups: int | None = None,
) -> nn.Module:
    """``num_classes`` = object classes (detection adds the background class itself).
    Detectors resize per ``sizing`` (default: squares of ``image_size``) with
    ``anchor_sizes`` per level (default: torchvision's).  ``groups``: part -> the process
    group its synchronized layers reduce over."""
    brn, groups = brn or {}, groups or {}
    kinds = {part: choice.kind for part, choice in plan.items()}
    kw = {part: norm_kwargs(kind, brn, groups.get(part), gn_groups) for part, kind in kinds.items()}
    if arch.startswith("resnet"):
        model = _resnet_body(arch, backbone_weights, num_classes)
        model = convert_norms(model, kinds["backbone"], **kw["backbone"])
        return convert_convs_to_ws(model) if plan["backbone"].ws else model
    backbone = _backbone_with_fpn(arch, kinds, kw, fpn_channels, backbone_weights)
    if plan["backbone"].ws:
        convert_convs_to_ws(backbone.body)
    if plan["neck"].ws:
        for blocks in (backbone.fpn.inner_blocks, backbone.fpn.layer_blocks):
            convert_convs_to_ws(blocks)
    head_choice = plan["head"]
    # gn: choose_groups(C) instead of torchvision's fixed 32, so any width works.
    head_norm = partial(build_norm, head_choice.kind, **kw["head"])
    if learns_running_stats(head_choice.kind):
        # The head's convs are shared across the FPN levels: one BN-family layer per level
        # (norms/per_level.py says why).
        shared = head_norm
        head_norm = lambda c: PerLevelNorm(lambda: shared(c), FPN_LEVELS)  # noqa: E731
    if sizing is None:
        if image_size is None:
            raise ModelError("a detector needs sizing= or image_size=")
        sizing = Sizing.square(image_size)
    model = _detector(
        arch, backbone, num_classes + 1, fpn_channels, head_norm, sizing, anchor_sizes
    )
    per_level_norms(model.head)
    if head_choice.ws:
        for tower in (model.head.classification_head.conv, model.head.regression_head.conv):
            convert_convs_to_ws(tower)
    return model


def _backbone_with_fpn(arch, kinds, kw, fpn_channels, weights) -> BackboneWithFPN:
    """The ResNet body with the backbone's norms, and an FPN with the neck's."""
    body = _resnet_body(arch, weights)
    body = convert_norms(body, kinds["backbone"], **kw["backbone"])
    if kinds["backbone"] == "frozenbn":
        # A frozen-statistics backbone is a fine-tuning set-up: keep the stem fixed too,
        # as torchvision's trainable_layers=3 does.
        for name, p in body.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    expansion = BACKBONES[backbone_of(arch)].expansion
    neck = kinds["neck"]
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128 * expansion, 256 * expansion, 512 * expansion],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
        norm_layer=None if neck == "none" else partial(build_norm, neck, **kw["neck"]),
    )


# P3-P7: the FPN's three levels from layer2-4 plus LastLevelP6P7's two.
FPN_LEVELS = 5


class _Transform(GeneralizedRCNNTransform):
    """torchvision's detection transform with a test size of its own: in training it
    draws one of ``min_size`` per image (torchvision's rule), in eval it resizes to
    ``test_size`` (torchvision would take the last training size)."""

    def __init__(self, sizing: Sizing, image_mean, image_std):
        super().__init__(sizing.min_size, sizing.max_size, image_mean, image_std)
        self.train_sizes, self.test_size = tuple(sizing.min_size), sizing.test_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return self


def default_anchor_sizes(arch: str) -> tuple[int, ...]:
    """torchvision's per-level anchor sizes (P3-P7) for FCOS and RetinaNet."""
    return (8, 16, 32, 64, 128) if arch.startswith("fcos") else (32, 64, 128, 256, 512)


def _detector(arch, backbone, num_classes, channels, head_norm, sizing, anchor_sizes):
    """FCOS or RetinaNet around ``backbone``; ``num_classes`` includes the background."""
    base = tuple(anchor_sizes or default_anchor_sizes(arch))
    common = dict(min_size=sizing.min_size, max_size=sizing.max_size, score_thresh=0.05)
    if arch.startswith("fcos"):
        anchors = AnchorGenerator(tuple((s,) for s in base), ((1.0,),) * FPN_LEVELS)
        head = _FCOSHead(channels, num_classes, head_norm)
        model = FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **common)
    else:
        # torchvision's three scales per octave
        anchors = AnchorGenerator(
            tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base),
            ((0.5, 1.0, 2.0),) * FPN_LEVELS,
        )
        head = RetinaNetHead(
            channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=head_norm
        )
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common)
    model.transform = _Transform(sizing, model.transform.image_mean, model.transform.image_std)
    return model

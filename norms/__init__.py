"""normpilot's normalization library: Batch Renorm, portable SyncBN / SyncBRN,
GroupNorm + Weight Standardization, a kind registry, model conversion and the
per-run norm policy."""

from torchvision.ops import FrozenBatchNorm2d

from norms.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from norms.convert import convert_norms, is_batch_norm
from norms.group_norm import choose_groups, group_norm
from norms.policy import PARTS, NormChoice, NormPolicy, select_norm
from norms.registry import available_norms, build_norm, get_norm, register_norm
from norms.sync import SyncBatchNorm, SyncBatchRenorm
from norms.weight_std import WSConv2d, convert_convs_to_ws, standardize_weight

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm2d",
    "NormChoice",
    "NormPolicy",
    "PARTS",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "WSConv2d",
    "available_norms",
    "build_norm",
    "choose_groups",
    "convert_convs_to_ws",
    "convert_norms",
    "get_norm",
    "group_norm",
    "is_batch_norm",
    "register_norm",
    "select_norm",
    "standardize_weight",
]

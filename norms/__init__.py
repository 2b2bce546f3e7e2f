"""normpilot's normalization library: Batch Renorm, portable SyncBN / SyncBRN,
GroupNorm + Weight Standardization, precise BN statistics, a kind registry, model
conversion and the per-run norm policy."""

from norms.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_diagnostics
from norms.convert import convert_norms, is_batch_norm, running_stat_layers
from norms.group_norm import choose_groups, group_norm
from norms.per_level import PerLevelNorm, per_level_norms
from norms.policy import PARTS, NormChoice, NormPolicy, resolve_device, select_norm
from norms.precise_bn import precise_bn
from norms.registry import (
    KindFacts,
    available_norms,
    build_norm,
    get_norm,
    is_batch_norm_kind,
    is_renorm_kind,
    is_sync_kind,
    kind_facts,
    learns_running_stats,
    norm_for_rank,
    register_norm,
    unregister_norm,
)
from norms.sync import SyncBatchNorm, SyncBatchRenorm
from norms.weight_std import WSConv2d, convert_convs_to_ws, standardize_weight

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm2d",
    "KindFacts",
    "NormChoice",
    "NormPolicy",
    "PerLevelNorm",
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
    "is_batch_norm_kind",
    "is_renorm_kind",
    "is_sync_kind",
    "kind_facts",
    "learns_running_stats",
    "norm_for_rank",
    "per_level_norms",
    "precise_bn",
    "register_norm",
    "renorm_diagnostics",
    "resolve_device",
    "running_stat_layers",
    "select_norm",
    "standardize_weight",
    "unregister_norm",
]


def __getattr__(name: str):
    # torchvision's FrozenBatchNorm2d, re-exported lazily: `import norms` does not import
    # torchvision (see norms.registry).
    if name == "FrozenBatchNorm2d":
        from torchvision.ops import FrozenBatchNorm2d

        return FrozenBatchNorm2d
    raise AttributeError(f"module 'norms' has no attribute {name!r}")

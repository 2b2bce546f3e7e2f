"""One norm layer per feature level, for detection heads whose convs are shared across
the FPN levels.

torchvision's FCOS and RetinaNet heads run the same conv + norm modules on every level
(P3-P7).  GroupNorm does not mind: it keeps no state.  A BatchNorm-family layer shared
that way would update its running statistics once per level (five times a step, mixing
the levels' statistics) and count five steps per training step in ``num_batches_tracked``,
so Batch Renorm's clip-limit ramp would end five times early.  ``PerLevelNorm`` holds one
layer per level and uses them in turn, so each level keeps its own statistics and each
layer counts one step per training step: detectron2's ``CycleBatchNormList`` (its
RetinaNet and FCOS heads with BN), with a reset at the start of every head forward so an
interrupted forward cannot leave the levels out of step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["PerLevelNorm", "drop_reset_hooks", "per_level_norms"]


class PerLevelNorm(nn.Module):
    """``levels`` layers built by ``make()``; the i-th call after a reset uses layer i
    (mod ``levels``)."""

    def __init__(self, make: Callable[[], nn.Module], levels: int):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = nn.ModuleList(make() for _ in range(levels))
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def forward(self, x: Tensor) -> Tensor:
        i = self._next % len(self.levels)
        self._next = i + 1
        out = x
        for j, layer in enumerate(self.levels):  # a loop TorchScript can unroll
            if j == i:
                out = layer(x)
        return out


def per_level_norms(head: nn.Module) -> nn.Module:
    """Reset ``head``'s PerLevelNorm layers at the start of each of its forwards (in
    place; returns ``head``).  A scripted export drops the hook: a whole forward calls
    each layer exactly ``levels`` times, so the count wraps to 0 by itself."""
    layers = [m for m in head.modules() if isinstance(m, PerLevelNorm)]

    def reset(_module, _args) -> None:
        for m in layers:
            m.reset()

    if layers:
        head._per_level_reset = head.register_forward_pre_hook(reset)
    return head


def drop_reset_hooks(model: nn.Module) -> nn.Module:
    """Remove the hooks ``per_level_norms`` added (TorchScript cannot script them)."""
    for m in model.modules():
        handle = m.__dict__.pop("_per_level_reset", None)
        if handle is not None:
            handle.remove()
    return model

"""The rules both studies share: how many steps a run gets, how a line's seeds are
summarized, and the bar the policy's line must clear against the best line of a cell."""

from __future__ import annotations

import statistics

__all__ = ["acceptance_bar", "mean_std", "paired_differences", "run_steps"]


def run_steps(recipe: dict, global_batch: int) -> int:
    """Optimizer steps of a run: the recipe's sample budget, at least one step, and never
    fewer than its ``min_steps`` (a step floor, so the largest batches are not
    under-trained; recipes without one have none)."""
    return max(1, recipe["samples"] // global_batch, recipe.get("min_steps", 0))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(a: list[float], a_seeds: list, b: list[float], b_seeds: list) -> list:
    """a - b per seed both measured (a common seed: the same initial weights and data
    order), in seed order."""
    common = sorted(set(a_seeds) & set(b_seeds))
    return [a[a_seeds.index(s)] - b[b_seeds.index(s)] for s in common]


def acceptance_bar(best: list[float]) -> float:
    """What the policy's line must reach in a cell: the best line's mean less
    max(1 point, 2 standard errors of that mean)."""
    mean, std = mean_std(best)
    return mean - max(1.0, 2 * std / max(1, len(best)) ** 0.5)

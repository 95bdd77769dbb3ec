"""Linear warmup followed by a truncated cosine: the shape of every CAPI schedule (learning rate,
teacher momentum, clustering learning rate; capi-method.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def warmup_cosine(
    step: int | float,
    total_steps: int,
    start: float,
    peak: float,
    end: float,
    warmup_steps: int,
    truncate: float = 1.0,
) -> float:
    """Value at ``step``: linear from ``start`` to ``peak`` over ``warmup_steps``, then a cosine from
    ``peak`` towards ``end`` of which only the first ``truncate`` of the period is used, so with
    ``truncate=0.8`` the run ends at ``end + (peak-end) * (1+cos(0.8 pi))/2`` (about 10 % of the way
    from ``end`` to ``peak``), never at ``end`` itself."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0) * truncate
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    """All per-step values of a run of ``total_steps`` steps."""

    total_steps: int
    lr: float
    momentum_peak: float = 0.999
    warmup_fraction: float = 0.1
    truncate: float = 0.8
    clustering_lr_ratio: float = 0.5

    @classmethod
    def of(cls, total_steps: int, optim: Any) -> Schedules:
        """The schedules of a run of ``total_steps`` steps with ``optim`` (a :class:`capi_lab.config.OptimConfig`)."""
        o = optim
        return cls(total_steps, o.lr, o.momentum_peak, o.warmup_fraction, o.truncate, o.clustering_lr_ratio)

    @property
    def warmup_steps(self) -> int:
        return int(self.total_steps * self.warmup_fraction)

    def _at(self, step: int, start: float, peak: float, end: float) -> float:
        return warmup_cosine(step, self.total_steps, start, peak, end, self.warmup_steps, self.truncate)

    def lr_at(self, step: int) -> float:
        return self._at(step, 0.0, self.lr, 0.0)

    def clustering_lr_at(self, step: int) -> float:
        return self.clustering_lr_ratio * self.lr_at(step)

    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum: 1.0 down to ``momentum_peak`` during warmup, then back towards 1."""
        return self._at(step, 1.0, self.momentum_peak, 1.0)

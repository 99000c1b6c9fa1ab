"""Learning-rate schedules of the released trainers, stepped once per optimizer step.

`WarmupDecay` is the schedule the paper releases train with: a linear warm-up from 0 over
`warmup_steps`, then a linear or cosine decay to `min_ratio` times the optimizer's learning rate
at `total_steps`. With `warmup_steps: 0, shape: linear` it is the transformers Trainer's default
(`lr_scheduler_type: linear`, the ReNIO and REDI releases); `shape: cosine` with a `min_ratio`
is verl's cosine schedule (the TRD release).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from renio_pl.errors import ConfigError

__all__ = ["WarmupDecay"]


class WarmupDecay(LambdaLR):
    """Factor on the optimizer's learning rate at optimizer step `k` (0 for the first update).

    `k < w`: `k / w`. After: `min_ratio + (1 - min_ratio) * d`, with `p = (k - w) / (T - w)` and
    `d = max(0, 1 - p)` (`linear`) or `d = (1 + cos(pi p)) / 2` (`cosine`).

    Args:
        optimizer: the optimizer whose learning rate is scaled.
        total_steps: `T`, the run's optimizer steps (the trainer's `max_steps`).
        warmup_steps: `w`, linear warm-up steps from 0.
        shape: `linear` or `cosine` decay after the warm-up.
        min_ratio: the factor the decay ends at, in [0, 1].
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        shape: Literal["linear", "cosine"] = "linear",
        min_ratio: float = 0.0,
    ) -> None:
        prefix = "model.lr_scheduler.init_args"
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ConfigError(f"{prefix}: need 0 <= warmup_steps < total_steps; got {warmup_steps} and {total_steps}")
        if shape not in ("linear", "cosine"):
            raise ConfigError(f"{prefix}.shape must be linear or cosine; got {shape!r}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_ratio must be in [0, 1]; got {min_ratio}")
        self.total_steps, self.warmup_steps, self.shape, self.min_ratio = total_steps, warmup_steps, shape, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The learning-rate factor at optimizer step `step`."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        decay = max(0.0, 1.0 - progress) if self.shape == "linear" else (1.0 + math.cos(math.pi * progress)) / 2
        return self.min_ratio + (1.0 - self.min_ratio) * decay

"""Fit-start checks for settings that would train silently wrong, each a one-line `ConfigError`.

- Trainable weights held in bf16 or fp16 without fp32 master weights: an AdamW step smaller
  than half a weight's spacing rounds away (in bf16, `0.02 + 5e-6 == 0.02`), so at a paper's
  learning rate most entries never move, and nothing else notices. Lightning's `bf16-true` /
  `16-true` cast every parameter, LoRA adapters included, to half precision. DeepSpeed keeps
  fp32 master weights in its optimizer, so it passes.
- `trainer.reload_dataloaders_every_n_epochs`: each epoch is one rollout round, generated when
  the training data loader is built. Lightning's default 0 builds it once, so every round would
  train on round 0's rollouts, ever more off-policy; 0 is therefore set to 1 here (logged), and
  any other value than 1 is refused.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from renio_pl.errors import ConfigError

__all__ = ["HALF_DTYPES", "check_fit_setup", "check_master_weights", "check_rollout_rounds"]

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def check_master_weights(trainer: pl.Trainer, module: torch.nn.Module) -> None:
    """Refuse trainable parameters in bf16/fp16 unless the strategy keeps fp32 master weights (DeepSpeed)."""
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        return
    half = [(name, p.dtype) for name, p in module.named_parameters() if p.requires_grad and p.dtype in HALF_DTYPES]
    if not half:
        return
    name, dtype = half[0]
    raise ConfigError(
        f"{len(half)} trainable parameters are held in {str(dtype).removeprefix('torch.')} (e.g. {name}) with no fp32 "
        f"master weights, so small updates round away (trainer.precision is {trainer.precision}); keep trainable "
        "weights in float32: set trainer.precision: bf16-mixed, and model.dtype: float32 for a fully trained student "
        "(a LoRA adapter is float32 on a bfloat16 base)"
    )


def check_rollout_rounds(trainer: pl.Trainer) -> None:
    """Rebuild the training data (a new rollout round) every epoch: 0 becomes 1, other values are refused."""
    every = trainer.reload_dataloaders_every_n_epochs
    if every == 1:
        return
    if every == 0:  # Lightning's default: never rebuilt, every round would reuse round 0's rollouts
        trainer.reload_dataloaders_every_n_epochs = 1
        log.info("trainer.reload_dataloaders_every_n_epochs set to 1: each epoch generates a new rollout round")
        return
    raise ConfigError(
        f"trainer.reload_dataloaders_every_n_epochs is {every}, so {every} epochs in a row would train on the same "
        "rollouts (off-policy); set it to 1: each epoch is one rollout round"
    )


def check_fit_setup(trainer: pl.Trainer, module: torch.nn.Module) -> None:
    """Both checks; call from `on_fit_start` (after the strategy has cast and wrapped the model)."""
    check_rollout_rounds(trainer)
    check_master_weights(trainer, module)

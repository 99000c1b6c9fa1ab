"""What `DistillationModule` and the data module serving it ask of each other (docs/architecture.md).

The two are separate Lightning objects that meet only through the trainer. Each side reads
the other through one of these protocols, never through private attributes: a data module or
model of your own works with ours when it provides the protocol's members.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["EvaluationData", "RolloutPolicy", "Teaching", "evaluation_data"]


@runtime_checkable
class EvaluationData(Protocol):
    """What the module reads from `trainer.datamodule`; without these members it assumes plain OPD data.

    Attributes:
        solution_field: set for OPSD (the teacher reads the problem with its reference solution).
        val_sampling: held-out sampling settings (`n` samples per problem), or None.
        test_sampling: benchmark sampling settings, or None.
        test_sets: the benchmarks, each with a `name` and an optional `verifier` (a `BatchVerifier`).
        val_rows: the held-out prompts (empty without `val_path`).
        dropped_prompts: prompts left out for length so far.
    """

    solution_field: str | None
    val_sampling: Any
    test_sampling: Any
    test_sets: list
    val_rows: list
    dropped_prompts: int

    def val_dataloader(self) -> Iterable: ...


@runtime_checkable
class RolloutPolicy(Protocol):
    """What the data module reads from `trainer.lightning_module`.

    Attributes:
        student: the policy rollouts are sampled from (the engine reads its current weights,
            and prompts must fit its context).
        device: where the data module's counts are reduced across processes.
    """

    student: torch.nn.Module
    device: torch.device


@runtime_checkable
class Teaching(Protocol):
    """What TRD's refiner also needs of the model: the model that rewrites the rollouts, and what it trains with.

    Attributes:
        separate_teacher: True when the teacher is a model of its own (`model.teacher`, OPD);
            False when the student's base weights teach (OPSD).
        loss, weighter: the objective's parts; each declares `needs_own_samples` (and
            `own_samples_reason`), as a rewritten rollout was not sampled by the student.
    """

    separate_teacher: bool
    loss: Any
    weighter: Any

    def teaching(self) -> AbstractContextManager[torch.nn.Module]:
        """The model that teaches (the OPD teacher, or for OPSD the student's base weights)."""
        ...


def evaluation_data(trainer: Any) -> EvaluationData | None:
    """`trainer.datamodule` when it provides `EvaluationData`, else None (no trainer, no data module, or another kind)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return datamodule if isinstance(datamodule, EvaluationData) else None

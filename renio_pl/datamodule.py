"""OnPolicyDataModule: each epoch is one rollout round generated with the current student.

`train_dataloader()` takes the round's `prompts_per_epoch` prompts, has the rollout engine
sample `n` completions of each with the student's current weights, grades them when the data
has answers, and serves the rollouts as `RolloutBatch`es. `val_dataloader()` does the same
for the held-out prompts with the evaluation sampling settings. Set
`trainer.reload_dataloaders_every_n_epochs: 1` (configs/base.yaml does) so both regenerate.
With several processes each rank generates the rollouts of its own share of the prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import is_correct
from renio_pl.models import load_tokenizer
from renio_pl.prompts import PromptFormat, PromptRow, load_rows, render_prompt
from renio_pl.rollouts import HFGenerator, Rollout, RolloutBatch, RolloutGenerator, SamplingConfig, collate_rollouts

__all__ = ["OnPolicyDataModule"]

log = logging.getLogger(__name__)


class OnPolicyDataModule(pl.LightningDataModule):
    """Prompts in, freshly sampled on-policy rollouts out, every epoch.

    Args:
        train_path: training prompts: a jsonl / parquet file or a hub data set id.
        val_path: held-out prompts with answers for validation accuracy, or None.
        tokenizer: the student's tokenizer (hub id or folder); linked from `model.student`.
        prompt_field: column holding the problem text.
        answer_field: column holding the reference answer; None when the data has none (no
            correctness labels then).
        split: split of a hub data set.
        prompt_format: template, system message and chat-template variables.
        engine: the rollout engine.
        sampling: training rollouts: `n` per prompt, temperature, top_p, top_k, max_new_tokens.
        val_sampling: held-out samples (default: one greedy completion per prompt).
        prompts_per_epoch: prompts per rollout round (over all processes).
        batch_size: rollouts per training micro-batch.
        val_batch_size: rollouts per validation batch.
        max_prompt_tokens: longest rendered prompt; longer ones are handled per `long_prompts`.
        long_prompts: `error` stops with a message; `drop` skips them (and logs how many).
        verifier: `(completion, answer) -> bool`, an import path in YAML.
        seed: seeds prompt order, sampling and batch order (with the epoch and rank).
    """

    def __init__(
        self,
        train_path: str,
        tokenizer: str,
        val_path: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        split: str = "train",
        prompt_format: PromptFormat = PromptFormat(),
        engine: RolloutGenerator = lazy_instance(HFGenerator),
        sampling: SamplingConfig = SamplingConfig(),
        val_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0),
        prompts_per_epoch: int = 32,
        batch_size: int = 8,
        val_batch_size: int = 64,
        max_prompt_tokens: int = 2048,
        long_prompts: Literal["error", "drop"] = "error",
        verifier: Callable[[str, str], bool] = is_correct,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("prompts_per_epoch", prompts_per_epoch), ("batch_size", batch_size),
                            ("val_batch_size", val_batch_size), ("max_prompt_tokens", max_prompt_tokens)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1; got {value}")
        if long_prompts not in ("error", "drop"):
            raise ConfigError(f"data.long_prompts must be error or drop; got {long_prompts!r}")
        self.train_path, self.val_path, self.split = train_path, val_path, split
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.prompt_format = prompt_format
        self.engine, self.sampling, self.val_sampling = engine, sampling, val_sampling
        self.prompts_per_epoch, self.batch_size, self.val_batch_size = prompts_per_epoch, batch_size, val_batch_size
        self.max_prompt_tokens, self.long_prompts = max_prompt_tokens, long_prompts
        self.verifier, self.seed = verifier, seed
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_rows: list[PromptRow] = []
        self.val_rows: list[PromptRow] = []
        self.train_prompt_ids: list[list[int]] = []
        self.val_prompt_ids: list[list[int]] = []
        self.dropped_prompts = 0

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.train_rows:
            self.train_rows, self.train_prompt_ids = self._prepare(self.train_path, "data.train_path")
        if stage in ("fit", "validate") and self.val_path is not None and not self.val_rows:
            self.val_rows, self.val_prompt_ids = self._prepare(self.val_path, "data.val_path")

    def _prepare(self, source: str, option: str) -> tuple[list[PromptRow], list[list[int]]]:
        """Load rows and render their prompts, applying the prompt-length policy."""
        rows = load_rows(source, self.prompt_field, self.answer_field, self.split, option)
        kept_rows, kept_ids = [], []
        for row in rows:
            ids = render_prompt(self.tokenizer, row.problem, self.prompt_format)
            if len(ids) > self.max_prompt_tokens:
                if self.long_prompts == "error":
                    raise ConfigError(
                        f"{option}: record {row.index} renders to {len(ids)} prompt tokens, over "
                        f"data.max_prompt_tokens={self.max_prompt_tokens}; raise it or set data.long_prompts=drop"
                    )
                continue
            kept_rows.append(row)
            kept_ids.append(ids)
        dropped = len(rows) - len(kept_rows)
        if dropped:
            rank_zero_info(f"{option}: dropped {dropped} of {len(rows)} prompts longer than {self.max_prompt_tokens} tokens")
            self.dropped_prompts += dropped
        if not kept_rows:
            raise ConfigError(f"{option}: every prompt is longer than data.max_prompt_tokens={self.max_prompt_tokens}")
        return kept_rows, kept_ids

    # --- one rollout round -------------------------------------------------------------------
    def round_prompt_indices(self, epoch: int) -> list[int]:
        """Indices of the prompts of round `epoch` (all ranks): consecutive slices of seeded passes."""
        size = len(self.train_rows)
        orders: dict[int, list[int]] = {}
        indices = []
        for position in range(epoch * self.prompts_per_epoch, (epoch + 1) * self.prompts_per_epoch):
            data_pass, offset = divmod(position, size)
            if data_pass not in orders:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + data_pass)
                orders[data_pass] = torch.randperm(size, generator=generator).tolist()
            indices.append(orders[data_pass][offset])
        return indices

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def generate_rollouts(
        self, rows: list[PromptRow], prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int
    ) -> list[Rollout]:
        """Sample `sampling.n` completions per prompt with the current student, decode and grade."""
        policy = self.trainer.lightning_module.student
        completions_P_G = self.engine.generate(policy, self.tokenizer, prompt_ids, sampling, seed)
        rollouts = []
        for row, ids, completions in zip(rows, prompt_ids, completions_P_G):
            for completion in completions:
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                correct = None if row.answer is None else bool(self.verifier(text, row.answer))
                rollouts.append(Rollout(ids, completion, row.index, sampling.temperature, row.answer, correct, text))
        return rollouts

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        rank, world = self._rank()
        indices = self.round_prompt_indices(epoch)[rank::world]
        seed = self.seed * 1_000_003 + epoch * 1_009 + rank
        rollouts = self.generate_rollouts(
            [self.train_rows[i] for i in indices], [self.train_prompt_ids[i] for i in indices], self.sampling, seed
        )
        order = torch.Generator().manual_seed(seed)
        return DataLoader(
            rollouts, batch_size=self.batch_size, shuffle=True, generator=order, collate_fn=self._collate
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out rollouts, sampled when iterated (so each validation sees the current student)."""
        if not self.val_rows:
            return []
        rank, world = self._rank()
        rows, ids = self.val_rows[rank::world], self.val_prompt_ids[rank::world]
        sample = partial(self.generate_rollouts, rows, ids, self.val_sampling, self.seed * 7_919 + rank)
        return DataLoader(_SampledOnIteration(sample, self.val_batch_size, self._collate), batch_size=None)

    def _collate(self, rollouts: list[Rollout]) -> RolloutBatch:
        return collate_rollouts(rollouts, self.tokenizer.pad_token_id)


class _SampledOnIteration(IterableDataset):
    """Batches of rollouts that are sampled anew each time the data set is iterated."""

    def __init__(self, sample: Callable[[], list[Rollout]], batch_size: int, collate: Callable) -> None:
        self.sample, self.batch_size, self.collate = sample, batch_size, collate

    def __iter__(self) -> Iterator[RolloutBatch]:
        rollouts = self.sample()
        for start in range(0, len(rollouts), self.batch_size):
            yield self.collate(rollouts[start : start + self.batch_size])

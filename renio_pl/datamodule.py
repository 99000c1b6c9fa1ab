"""OnPolicyDataModule: each epoch is one rollout round generated with the current student.

`train_dataloader()` takes the round's `prompts_per_epoch` prompts, has the rollout engine
sample `n` completions of each with the student's current weights, grades them when the data
has answers, and serves the rollouts as `RolloutBatch`es. Held-out and benchmark evaluation
(`val_dataloader()`, `test_dataloader()`, `predict_dataloader()`), loading and rendering the
prompts and the length policy are the shared base's, `renio_pl.heldout.HeldOutDataModule`. Set
`trainer.reload_dataloaders_every_n_epochs: 1` (`renio-pl`'s default) so the training
rounds regenerate. With several processes each rank generates the rollouts of its own share
of the prompts; the shares are then evened out (`balance_shares`) so that every rank trains
the same number of batches each round, whatever the prompt count, `n`, batch size or the
refiner's drops. With `solution_field` set the data module serves OPSD: each training rollout
also carries the teacher's privileged prompt (the problem with its reference solution, through
`teacher_prompt_format`), and the teacher scores the same completion tokens after it. With a
`refiner` (TRD, `renio_pl.refinement`) each training rollout is rewritten whole by the teacher
before it is served, on the refiner's schedule: every round, or once for the whole data set.
Every sample's randomness is keyed by (seed, round, prompt, sample)
(`renio_pl.sampling`), so it is the same whatever the number of processes or batch size.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import extract_answer, is_correct
from renio_pl.heldout import EvalSet, HeldOutDataModule, data_seed, require_positive
from renio_pl.loaders import OwnShare, ResumableLoader, balance_shares, batch_sizes, trained_batches
from renio_pl.monitoring import RoundStats
from renio_pl.paths import InputPath
from renio_pl.prompt_format import OPSD_TEACHER_TEMPLATE, PromptFormat
from renio_pl.prompt_source import PromptSource
from renio_pl.prompts import PromptRow
from renio_pl.refinement import Refiner, refinement_counts, refinement_metrics
from renio_pl.rollouts import HFGenerator, Rollout, RolloutBatch, RolloutGenerator, SamplingConfig, collate_rollouts
from renio_pl.sampling import stream_key

# EvalSet, data_seed and the loaders keep their old import path here too.
__all__ = ["EvalSet", "OnPolicyDataModule", "ResumableLoader", "balance_shares", "batch_sizes", "data_seed"]

log = logging.getLogger(__name__)

_REWRITE_STREAM = "rewrite"  # names the random streams of the refiner's rewrites
_INITIAL_STREAM = "initial_student"  # ... of the rollouts a `once` refiner rewrites


class OnPolicyDataModule(HeldOutDataModule):
    """Prompts in, freshly sampled on-policy rollouts out, every epoch.

    Args:
        train_path: training prompts: a jsonl / parquet file or a hub data set id (needed to fit).
        val_path: held-out prompts with answers for validation accuracy, or None.
        tokenizer: the student's tokenizer (hub id or folder); linked from `model.student`.
        prompt_field: column holding the problem text.
        answer_field: column holding the reference answer; None when the data has none (no
            correctness labels then).
        answer_after: keep only the text after the last occurrence of this marker in each
            answer (GSM8K: `####`); empty keeps the whole answer.
        split: split of a hub data set.
        subset: subset (configuration name) of a hub data set, e.g. `main` for `openai/gsm8k`.
        prompt_format: the student's template, system message and chat-template variables.
        solution_field: column holding a reference solution: set it for OPSD, where the
            teacher reads it in its privileged prompt; None (OPD) gives the teacher the
            student's prompt.
        teacher_prompt_format: the teacher's privileged prompt (with `{solution}`), used when
            `solution_field` is set; the default is the OPSD authors' template, thinking on.
            With a `refiner` the teacher reads the rewrite prompt instead.
        refiner: rewrites each training rollout whole with the teacher before it is trained on
            (TRD, `renio_pl.refinement.Refiner`); None trains on the student's rollouts.
        engine: the rollout engine.
        sampling: training rollouts: `n` per prompt, temperature, top_p, top_k, max_new_tokens.
        val_sampling: held-out samples (default: one greedy completion per prompt).
        test_sets: benchmarks for `test` and `predict`.
        test_sampling: their samples: `n` is the k of Avg@k (default: the paper's 12 samples
            at temperature 1.0, top_p 0.95).
        prompts_per_epoch: prompts per rollout round (over all processes).
        batch_size: rollouts per training micro-batch.
        val_batch_size: rollouts per validation, test or predict batch.
        max_prompt_tokens: longest rendered prompt; longer ones are handled per `long_prompts`.
        long_prompts: `error` stops with a message; `drop` skips them (and logs how many).
        verifier: `(completion, answer) -> bool`, an import path in YAML; with `answer_extractor`
            it makes the `MathVerifier` that grades every rollout whose test set has no verifier.
        answer_extractor: `completion -> final answer or None`, for majority voting.
        group_field: column of the training and held-out data holding each problem's group
            (e.g. `carry`); the diagnostics then log accuracy per group. None: no groups.
        seed: seeds prompt order, sampling and batch order (with the epoch and rank); None
            follows the global seed of `seed_everything` (0 when none was set), so
            `--seed_everything N` alone gives a different run.
    """

    def __init__(
        self,
        train_path: InputPath | None = None,
        tokenizer: str | None = None,
        val_path: InputPath | None = None,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        answer_after: str = "",
        split: str = "train",
        subset: str | None = None,
        prompt_format: PromptFormat = PromptFormat(),
        solution_field: str | None = None,
        teacher_prompt_format: PromptFormat = PromptFormat(
            template=OPSD_TEACHER_TEMPLATE, chat_template_kwargs={"enable_thinking": True}
        ),
        refiner: Refiner | None = None,
        engine: RolloutGenerator = lazy_instance(HFGenerator),
        sampling: SamplingConfig = SamplingConfig(),
        val_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0),
        test_sets: list[EvalSet] | None = None,
        test_sampling: SamplingConfig = SamplingConfig(n=12, temperature=1.0, top_p=0.95),
        prompts_per_epoch: int = 32,
        batch_size: int = 8,
        val_batch_size: int = 64,
        max_prompt_tokens: int = 2048,
        long_prompts: Literal["error", "drop"] = "error",
        verifier: Callable[[str, str], bool] = is_correct,
        answer_extractor: Callable[[str], str | None] = extract_answer,
        seed: int | None = None,
        group_field: str | None = None,
    ) -> None:
        require_positive(prompts_per_epoch=prompts_per_epoch, batch_size=batch_size)
        if solution_field is not None and "{solution}" not in teacher_prompt_format.template:
            raise ConfigError(
                "data.teacher_prompt_format.template must contain {solution} (OPSD's privileged context); "
                f"got {teacher_prompt_format.template!r}"
            )
        if refiner is not None:
            refiner.check_data(solution_field, sampling)
        described = partial(
            PromptSource, prompt_field=prompt_field, answer_field=answer_field, answer_after=answer_after, split=split,
            subset=subset, prompt_format=prompt_format, group_field=group_field,
        )
        super().__init__(
            tokenizer, val_source=None if val_path is None else described(val_path, "data.val_path"),
            prompt_format=prompt_format, engine=engine, val_sampling=val_sampling, test_sets=test_sets,
            test_sampling=test_sampling, val_batch_size=val_batch_size, max_prompt_tokens=max_prompt_tokens,
            long_prompts=long_prompts, verifier=verifier, answer_extractor=answer_extractor, seed=seed,
        )
        self.solution_field, self.teacher_prompt_format = solution_field, teacher_prompt_format
        self.refiner, self.sampling = refiner, sampling
        self.prompts_per_epoch, self.batch_size = prompts_per_epoch, batch_size
        self.train_source = None if train_path is None else described(
            train_path, "data.train_path", solution_field=solution_field, teacher_prompt_format=teacher_prompt_format
        )
        self.train_rows: list[PromptRow] = []
        self.train_prompt_ids: list[list[int]] = []
        self.train_teacher_prompt_ids: list[list[int]] | None = None  # OPSD only
        self.dropped_rollouts = 0  # training rollouts left out to give every rank the same batches
        self._round: list[Rollout] = []  # this rank's rollouts of round `_round_epoch`
        self._round_epoch: int | None = None
        self._round_longest = 0  # the most rollouts any rank has in the current round
        self.round_stats: RoundStats | None = None  # the last sampled round's cost
        self._refined: dict[int, list[Rollout]] | None = None  # a `once` refiner's rollouts, by prompt index

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_source is None:
            raise ConfigError("fit needs training prompts: set data.train_path to a .jsonl / .parquet file or a hub id")
        world = self._rank()[1]
        if stage == "fit" and self.prompts_per_epoch < world:
            raise ConfigError(
                f"data.prompts_per_epoch={self.prompts_per_epoch} is under the {world} processes: each process "
                f"samples at least one prompt a round; set it to {world} or more"
            )
        module = getattr(self.trainer, "lightning_module", None)
        if stage == "fit" and self.refiner is not None and module is not None:
            self.refiner.check_model(module, self.engine)
        if stage == "fit" and not self.train_rows:
            self.train_rows, self.train_prompt_ids, self.train_teacher_prompt_ids = self._prepare(
                self.train_source, self.sampling, "data.sampling"
            )
        super().setup(stage)  # the held-out prompts and benchmarks

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

    def sample_round(self, epoch: int) -> list[Rollout]:
        """This rank's rollouts of round `epoch`, sampled with the current student (and refined, with a refiner)."""
        rank, world = self._rank()
        indices = self.round_prompt_indices(epoch)[rank::world]
        if self.refiner is None:
            return self._sample(indices, epoch)
        if self.refiner.schedule == "every_round":
            return self._refine(self._sample(indices, epoch), epoch)
        if self._refined is None:  # `once`: the first round refines the initial student's rollouts of every prompt
            self._refined = self._refine_data_set()
        return [r for i in indices for r in self._refined.get(self.train_rows[i].index, [])]

    def _sample(self, indices: list[int], stream: int) -> list[Rollout]:
        """Rollouts of the training prompts at `indices`; sample `j` of each keyed by (seed, stream, prompt, j)."""
        rows, ids = [self.train_rows[i] for i in indices], [self.train_prompt_ids[i] for i in indices]
        teacher_ids = None if self.train_teacher_prompt_ids is None else [self.train_teacher_prompt_ids[i] for i in indices]
        seeds = [stream_key(self.seed, stream, row.index) for row in rows]
        return self.generate_rollouts(rows, ids, self.sampling, seeds, teacher_ids)

    def _refine(self, attempts: list[Rollout], stream: int) -> list[Rollout]:
        """The refiner's graded rewrites of `attempts` by the module's teacher; logs `refine/*` (call on every rank)."""
        module = self.trainer.lightning_module
        rows = {row.index: row for row in self.train_rows}
        key = zlib.crc32(_REWRITE_STREAM.encode())
        seeds = [stream_key(self.seed, key, stream, a.prompt_index, a.sample_index) for a in attempts]
        with module.teaching() as rewriter:  # one home decides who teaches: the OPD teacher or the base weights
            refined = self.refiner.refine(attempts, rows, rewriter, self.tokenizer, self.engine, seeds)
        self._grade(refined, None)
        counts = self.trainer.strategy.reduce(refinement_counts(attempts, refined).to(module.device), reduce_op="sum")
        for logger in self.trainer.loggers:
            logger.log_metrics(refinement_metrics(counts), step=self.trainer.global_step)
        return refined

    def _refine_data_set(self) -> dict[int, list[Rollout]]:
        """Every training prompt's rollouts, sampled by the current student and refined; each rank gets all of them."""
        rank, world = self._rank()
        stream = zlib.crc32(_INITIAL_STREAM.encode())
        refined = self._refine(self._sample(list(range(rank, len(self.train_rows), world)), stream), stream)
        shares = [refined]
        if dist.is_available() and dist.is_initialized():
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, refined)
        return _by_prompt([r for share in shares for r in share])

    def train_dataloader(self) -> DataLoader:
        """This rank's rollouts of round `current_epoch`: sampled now, or restored from a checkpoint."""
        epoch = self.trainer.current_epoch
        rank, _ = self._rank()
        if self._round_epoch != epoch:
            start = time.perf_counter()
            sampled = self.sample_round(epoch)
            self.round_stats = RoundStats.of(epoch, sampled, time.perf_counter() - start)  # logged by TrainingMonitor
            self._round, self._round_epoch = self._even_out(sampled), epoch
        order = torch.Generator().manual_seed(stream_key(self.seed, epoch, rank))
        shuffled = [self._round[i] for i in torch.randperm(len(self._round), generator=order).tolist()]
        sizes = batch_sizes(len(shuffled), self._round_batches, self.batch_size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [shuffled[start : start + size] for start, size in zip(starts, sizes)]
        return ResumableLoader(
            partial(trained_batches, self.trainer), batches, batch_size=None, sampler=OwnShare(batches),
            collate_fn=self._collate,
        )

    def _even_out(self, rollouts: list[Rollout]) -> list[Rollout]:
        """This rank's rollouts after `balance_shares` over every rank (one collective; two when shares differ).

        Logs the rollouts moved (info) and dropped (a warning, and `data/dropped_rollouts`, the run's total).
        """
        rank, world = self._rank()
        self._round_longest = len(rollouts)
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return rollouts
        counts = [None] * world
        dist.all_gather_object(counts, len(rollouts))
        if len(set(counts)) == 1:
            return rollouts
        shares = [None] * world
        dist.all_gather_object(shares, rollouts)
        balanced, dropped = balance_shares(shares, self.batch_size)
        self._round_longest = max(map(len, balanced))
        moved = sum(max(count - len(share), 0) for count, share in zip(counts, balanced)) - dropped
        epoch = self.trainer.current_epoch
        rank_zero_info(
            f"round {epoch}: the processes sampled {counts} rollouts; {moved} moved so that each trains "
            f"{self._round_batches} batches"
        )
        if dropped:
            self.dropped_rollouts += dropped
            rank_zero_warn(
                f"round {epoch}: left out {dropped} of {sum(counts)} rollouts so that every process trains the same "
                f"number of batches of at most data.batch_size={self.batch_size} (a multiple of the "
                f"{world} processes avoids it)"
            )
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/dropped_rollouts": float(self.dropped_rollouts)}, step=self.trainer.global_step)
        return balanced[rank]

    @property
    def _round_batches(self) -> int:
        """Batches every rank trains in the current round: its longest share over `batch_size`."""
        return math.ceil(self._round_longest / self.batch_size)

    def state_dict(self) -> dict:
        """The current round's rollouts (every rank's), so a run resumed mid-epoch trains on the same ones.

        With a `once` refiner also its refined set (the same on every rank), which the resumed run
        serves instead of refining the trained student's rollouts.
        """
        if self._round_epoch is None:
            return {}
        local = [asdict(r) for r in self._round]
        rounds = [local]
        if dist.is_available() and dist.is_initialized():
            rounds = [None] * dist.get_world_size()
            dist.all_gather_object(rounds, local)
        state = {"epoch": self._round_epoch, "rounds": rounds}
        if self._refined is not None:
            state["refined"] = [asdict(r) for rollouts in self._refined.values() for r in rollouts]
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        rank, world = self._rank()
        if len(state["rounds"]) != world:
            raise ConfigError(
                f"the checkpoint's round was sampled by {len(state['rounds'])} processes, this run has {world}; "
                "resume with the same number of processes or from an end-of-epoch checkpoint"
            )
        self._round_epoch, self._round = state["epoch"], [Rollout(**r) for r in state["rounds"][rank]]
        self._round_longest = max(len(share) for share in state["rounds"])
        if "refined" in state:
            self._refined = _by_prompt([Rollout(**r) for r in state["refined"]])

    def _collate(self, rollouts: list[Rollout]) -> RolloutBatch:
        return collate_rollouts(rollouts, self.tokenizer.pad_token_id)


def _by_prompt(rollouts: list[Rollout]) -> dict[int, list[Rollout]]:
    """Rollouts grouped by `prompt_index`, each group in the given order."""
    groups: dict[int, list[Rollout]] = {}
    for rollout in rollouts:
        groups.setdefault(rollout.prompt_index, []).append(rollout)
    return groups

"""OnPolicyDataModule: each epoch is one rollout round generated with the current student.

`train_dataloader()` takes the round's `prompts_per_epoch` prompts, has the rollout engine
sample `n` completions of each with the student's current weights, grades them when the data
has answers, and serves the rollouts as `RolloutBatch`es. `val_dataloader()` does the same
for the held-out prompts with the evaluation sampling settings, and `test_dataloader()` /
`predict_dataloader()` for each benchmark in `test_sets`. Set
`trainer.reload_dataloaders_every_n_epochs: 1` (the shipped configs do) so the training
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
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from renio_pl.contracts import RolloutPolicy
from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import MathVerifier, extract_answer, is_correct
from renio_pl.evaluators.verifier import BatchVerifier
from renio_pl.models import load_tokenizer
from renio_pl.monitoring import RoundStats
from renio_pl.paths import InputPath
from renio_pl.prompts import OPSD_TEACHER_TEMPLATE, PromptFormat, PromptRow, load_rows, render_prompt
from renio_pl.refinement import Refiner, refinement_counts, refinement_metrics
from renio_pl.rollouts import HFGenerator, Rollout, RolloutBatch, RolloutGenerator, SamplingConfig, collate_rollouts
from renio_pl.sampling import stream_key

__all__ = ["EvalSet", "OnPolicyDataModule", "ResumableLoader", "balance_shares", "batch_sizes"]

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A benchmark for `renio-pl test` / `predict`.

    Attributes:
        name: the name results are reported under (`test/<name>/avg@k`).
        path: a jsonl / parquet file or a hub data set id.
        prompt_field: column holding the problem text.
        answer_field: column holding the reference answer; None for prompts without one.
        answer_after: keep only the text after the last occurrence of this marker in the
            answer (GSM8K: `####`); empty keeps the whole answer.
        split: split of a hub data set.
        subset: subset (configuration name) of a hub data set, e.g. `main` for `openai/gsm8k`.
        limit: only the first `limit` problems (0: all), for quick runs; the report's problem
            count shows it, and such a run is not the benchmark's number.
        prompt_format: this benchmark's prompt; None uses `data.prompt_format`.
        verifier: grades this benchmark's completions (code:
            `renio_pl.evaluators.code.CodeVerifier`); None grades them with the data's
            verifier (`data.verifier` and `data.answer_extractor`).
    """

    name: str
    path: InputPath
    prompt_field: str = "problem"
    answer_field: str | None = "answer"
    answer_after: str = ""
    split: str = "test"
    subset: str | None = None
    limit: int = 0
    prompt_format: PromptFormat | None = None
    verifier: BatchVerifier | None = None


_VALIDATION_STREAM = "validation"  # names the random streams of validation samples
_REWRITE_STREAM = "rewrite"  # ... of the refiner's rewrites
_INITIAL_STREAM = "initial_student"  # ... of the rollouts a `once` refiner rewrites


def data_seed(seed: int | None) -> int:
    """`seed`, or when None the global seed `seed_everything` set (Lightning's `PL_GLOBAL_SEED`; 0 when unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


class OnPolicyDataModule(pl.LightningDataModule):
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
        super().__init__()
        for name, value in (("prompts_per_epoch", prompts_per_epoch), ("batch_size", batch_size),
                            ("val_batch_size", val_batch_size), ("max_prompt_tokens", max_prompt_tokens)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1; got {value}")
        if long_prompts not in ("error", "drop"):
            raise ConfigError(f"data.long_prompts must be error or drop; got {long_prompts!r}")
        if tokenizer is None:
            raise ConfigError("data.tokenizer is missing: give the student's hub id or folder (the CLI links model.student)")
        self.train_path, self.val_path, self.split, self.subset = train_path, val_path, split, subset
        self.prompt_field, self.answer_field, self.answer_after = prompt_field, answer_field, answer_after
        self.prompt_format = prompt_format
        if solution_field is not None and "{solution}" not in teacher_prompt_format.template:
            raise ConfigError(
                "data.teacher_prompt_format.template must contain {solution} (OPSD's privileged context); "
                f"got {teacher_prompt_format.template!r}"
            )
        self.solution_field, self.teacher_prompt_format = solution_field, teacher_prompt_format
        if refiner is not None:
            refiner.check_data(solution_field, sampling)
        self.refiner = refiner
        self.engine, self.sampling, self.val_sampling = engine, sampling, val_sampling
        self.test_sets, self.test_sampling = list(test_sets or []), test_sampling
        names = [s.name for s in self.test_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.test_sets: names must differ; got {names}")
        if any(s.limit < 0 for s in self.test_sets):
            raise ConfigError("data.test_sets: limit must be >= 0 (0: every problem)")
        self.prompts_per_epoch, self.batch_size, self.val_batch_size = prompts_per_epoch, batch_size, val_batch_size
        self.max_prompt_tokens, self.long_prompts = max_prompt_tokens, long_prompts
        self.seed = data_seed(seed)
        self.default_verifier: BatchVerifier = MathVerifier(verifier, answer_extractor)  # sets without their own
        self.group_field = group_field
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_rows: list[PromptRow] = []
        self.val_rows: list[PromptRow] = []
        self.train_prompt_ids: list[list[int]] = []
        self.train_teacher_prompt_ids: list[list[int]] | None = None  # OPSD only
        self.val_prompt_ids: list[list[int]] = []
        self.test_rows: dict[str, tuple[list[PromptRow], list[list[int]]]] = {}
        self.test_verifiers = {s.name: s.verifier for s in self.test_sets}
        self.dropped_prompts = 0
        self.dropped_rollouts = 0  # training rollouts left out to give every rank the same batches
        self._round: list[Rollout] = []  # this rank's rollouts of round `_round_epoch`
        self._round_epoch: int | None = None
        self._round_longest = 0  # the most rollouts any rank has in the current round
        self.round_stats: RoundStats | None = None  # the last sampled round's cost
        self._refined: dict[int, list[Rollout]] | None = None  # a `once` refiner's rollouts, by prompt index

    def setup(self, stage: str) -> None:
        own_fields = (self.prompt_field, self.answer_field, self.split, self.answer_after or None)
        if stage == "fit" and self.train_path is None:
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
                self.train_path, "data.train_path", self.sampling, "data.sampling", *own_fields,
                solution_field=self.solution_field, group_field=self.group_field, subset=self.subset,
            )
        if stage in ("fit", "validate") and self.val_path is not None and not self.val_rows:
            self.val_rows, self.val_prompt_ids, _ = self._prepare(
                self.val_path, "data.val_path", self.val_sampling, "data.val_sampling", *own_fields,
                group_field=self.group_field, subset=self.subset,
            )
        if stage in ("test", "predict") and not self.test_rows:
            if not self.test_sets:
                command = "test" if stage == "test" else "predict"
                raise ConfigError(f"{command} needs benchmarks: set data.test_sets (see configs/eval/)")
            for i, eval_set in enumerate(self.test_sets):
                rows, ids, _ = self._prepare(
                    eval_set.path, f"data.test_sets[{i}].path", self.test_sampling, "data.test_sampling",
                    eval_set.prompt_field, eval_set.answer_field, eval_set.split, eval_set.answer_after or None,
                    prompt_format=eval_set.prompt_format, subset=eval_set.subset,
                )
                end = eval_set.limit or len(rows)
                self.test_rows[eval_set.name] = rows[:end], ids[:end]

    def _prepare(
        self,
        source: str,
        option: str,
        sampling: SamplingConfig,
        sampling_option: str,
        prompt_field: str,
        answer_field: str | None,
        split: str,
        answer_after: str | None = None,
        solution_field: str | None = None,
        prompt_format: PromptFormat | None = None,
        group_field: str | None = None,
        subset: str | None = None,
    ) -> tuple[list[PromptRow], list[list[int]], list[list[int]] | None]:
        """Load rows and render their prompts (and the teacher's, for OPSD), applying the prompt-length policy.

        Prompts are rendered with `prompt_format`, or `data.prompt_format` when None.

        With an answer field, records whose answer is missing or empty are dropped and
        counted (in `dropped_prompts`, logged as `data/dropped_prompts`). A prompt is too
        long past `max_prompt_tokens`, or when it and the stage's `max_new_tokens` do not fit
        in the student's context (`max_position_embeddings`); for OPSD the teacher's prompt
        is held to the same limit.
        """
        rows = load_rows(
            source, prompt_field, answer_field, split, option, answer_after=answer_after, solution_field=solution_field,
            group_field=group_field,
            subset=subset,
        )
        limit, reason = self.max_prompt_tokens, f"data.max_prompt_tokens={self.max_prompt_tokens}"
        context = self._student_context()
        if context is not None:
            new_tokens = sampling.max_new_tokens
            if new_tokens >= context:
                raise ConfigError(
                    f"{sampling_option}.max_new_tokens={new_tokens} leaves no room for a prompt in the student's "
                    f"context of {context} tokens; lower it"
                )
            if context - new_tokens < limit:
                limit = context - new_tokens
                reason = f"the student's context ({context} tokens) minus {sampling_option}.max_new_tokens={new_tokens}"
        answered = [row for row in rows if answer_field is None or row.answer]
        if len(answered) < len(rows):  # a batch is labelled only when every rollout has an answer
            first = next(row.index for row in rows if not row.answer)
            rank_zero_info(f"{option}: dropped {len(rows) - len(answered)} records without an answer (first: record {first})")
            self.dropped_prompts += len(rows) - len(answered)
            rows = answered
        kept_rows, kept_ids, kept_teacher_ids = [], [], []
        for row in rows:
            ids = render_prompt(self.tokenizer, row.problem, prompt_format or self.prompt_format, messages=row.messages)
            teacher_ids = None
            if solution_field is not None:
                teacher_ids = render_prompt(
                    self.tokenizer, row.problem, self.teacher_prompt_format, row.solution, messages=row.messages
                )
            longest = max(len(ids), len(teacher_ids or []))
            if longest > limit:
                if self.long_prompts == "error":
                    whose = "prompt" if len(ids) == longest else "teacher prompt (with the solution)"
                    raise ConfigError(
                        f"{option}: record {row.index} renders to a {longest}-token {whose}, over {reason}; "
                        "shorten it, make room, or set data.long_prompts=drop"
                    )
                continue
            kept_rows.append(row)
            kept_ids.append(ids)
            kept_teacher_ids.append(teacher_ids)
        dropped = len(rows) - len(kept_rows)
        if dropped:
            rank_zero_info(f"{option}: dropped {dropped} of {len(rows)} prompts longer than {limit} tokens ({reason})")
            self.dropped_prompts += dropped
        if not kept_rows:
            raise ConfigError(f"{option}: every prompt is longer than {limit} tokens ({reason})")
        return kept_rows, kept_ids, kept_teacher_ids if solution_field is not None else None

    def _student_context(self) -> int | None:
        """The student's `max_position_embeddings`, when a trainer with our module is attached."""
        policy = self._policy()
        config = getattr(policy.student, "config", None) if policy is not None else None  # a Hugging Face config
        return getattr(config, "max_position_embeddings", None)

    def _policy(self) -> RolloutPolicy | None:
        """The attached model, when it provides `RolloutPolicy` (the student rollouts are sampled from)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return module if isinstance(module, RolloutPolicy) else None

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
        self,
        rows: list[PromptRow],
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        seeds: list[int],
        teacher_prompt_ids: list[list[int]] | None = None,
        verifier: BatchVerifier | None = None,
    ) -> list[Rollout]:
        """Sample `sampling.n` completions per prompt with the current student, decode and grade.

        Completions are graded with `verifier` when given, else with the data's verifier
        (`data.verifier`, final answers taken by `data.answer_extractor`).
        """
        policy = self.trainer.lightning_module.student  # RolloutPolicy.student
        completions_P_G = self.engine.generate(policy, self.tokenizer, prompt_ids, sampling, seeds)
        teacher_prompt_ids = teacher_prompt_ids or [None] * len(rows)
        rollouts = []
        for row, ids, teacher_ids, completions in zip(rows, prompt_ids, teacher_prompt_ids, completions_P_G):
            for j, completion in enumerate(completions):
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                rollouts.append(Rollout(ids, completion, row.index, sampling.temperature, j, row.answer, text=text,
                                        teacher_prompt_ids=teacher_ids, group=row.group))
        self._grade(rollouts, verifier)
        return rollouts

    def _grade(self, rollouts: list[Rollout], verifier: BatchVerifier | None) -> None:
        """Fills in the verdicts (`correct`, `final_answer`, `verdict`) with `verifier`, else the data's.

        A rollout without an answer gets `correct` None (and the verifier's final answer, if any).
        """
        verdicts = (verifier or self.default_verifier).grade([r.text for r in rollouts], [r.answer for r in rollouts])
        for rollout, verdict in zip(rollouts, verdicts, strict=True):
            rollout.correct, rollout.final_answer, rollout.verdict = verdict.correct, verdict.final_answer, verdict.detail

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
            self._batches_done, batches, batch_size=None, sampler=_OwnShare(batches), collate_fn=self._collate,
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

    def _batches_done(self) -> int:
        """Training batches of the current epoch done so far (read from the fit loop's progress)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

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

    def val_dataloader(self) -> DataLoader:
        """Held-out rollouts, sampled when iterated (so each validation sees the current student)."""
        if not self.val_rows:
            return []
        return self._evaluation_loader(_VALIDATION_STREAM, self.val_rows, self.val_prompt_ids, self.val_sampling)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per benchmark in `test_sets`, yielding lists of graded `Rollout`s."""
        return [
            self._evaluation_loader(name, *self.test_rows[name], self.test_sampling, self.test_verifiers[name])
            for name in self.test_rows
        ]

    predict_dataloader = test_dataloader

    def _evaluation_loader(
        self,
        stream: str,
        rows: list[PromptRow],
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        verifier: BatchVerifier | None = None,
    ) -> DataLoader:
        """This rank's share of the problems; each sample keyed by (seed, stream, problem, sample)."""
        rank, world = self._rank()
        rows, prompt_ids = rows[rank::world], prompt_ids[rank::world]
        seeds = [stream_key(self.seed, zlib.crc32(stream.encode()), row.index) for row in rows]
        sample = partial(self.generate_rollouts, rows, prompt_ids, sampling, seeds, verifier=verifier)
        return DataLoader(_SampledOnIteration(sample, self.val_batch_size), batch_size=None)

    def _collate(self, rollouts: list[Rollout]) -> RolloutBatch:
        return collate_rollouts(rollouts, self.tokenizer.pad_token_id)


def balance_shares(shares: list[list[Rollout]], batch_size: int) -> tuple[list[list[Rollout]], int]:
    """Every rank's rollouts of a round, dealt again so that all ranks train the same number of batches.

    Shares are evened to sizes that differ by at most one (rank `r` keeps `q + 1` when `r` is under
    the remainder of `R / world`, else `q`): a rank over its size hands its last rollouts on, in rank
    order, to the ranks under theirs. Every rank then trains `ceil((q + 1) / batch_size)` batches
    (`batch_sizes`), a `q`-rollout share in smaller ones. Only when a `q`-rollout share cannot fill
    that many batches (`batch_size` 1, or fewer rollouts than ranks) is the remainder left out: the
    last rollout of each `q + 1` share.

    Args:
        shares: per rank, its rollouts of the round (the same lists on every rank).
        batch_size: the most rollouts in a batch (`data.batch_size`).
    Returns:
        The new shares (rank-ordered), and how many rollouts were left out.
    """
    world, total = len(shares), sum(map(len, shares))
    base, remainder = divmod(total, world)
    sizes = [base + (rank < remainder) for rank in range(world)]
    spare = [r for share, size in zip(shares, sizes) for r in share[size:]]
    balanced = []
    for share, size in zip(shares, sizes):
        kept = share[:size]
        taken, spare = spare[: size - len(kept)], spare[size - len(kept):]
        balanced.append(kept + taken)
    dropped = 0
    if remainder and base < math.ceil((base + 1) / batch_size):
        balanced = [share[:base] for share in balanced]
        dropped = remainder
    return balanced, dropped


def batch_sizes(rollouts: int, batches: int, batch_size: int) -> list[int]:
    """Sizes of `batches` non-empty batches of `rollouts`: full batches of `batch_size` first.

    `batches` is `ceil(longest share / batch_size)` (`balance_shares`), so a share as long as the
    longest is batched as usual, and a shorter one ends in smaller batches: in 3 batches of at most
    2, 5 rollouts give [2, 2, 1] and 4 give [2, 1, 1].
    """
    if not batches <= rollouts <= batches * batch_size:
        raise ValueError(f"{rollouts} rollouts do not fill {batches} batches of 1 to {batch_size}")
    sizes, left = [], rollouts
    for i in range(batches):
        size = min(batch_size, left - (batches - i - 1))
        sizes.append(size)
        left -= size
    return sizes


def _by_prompt(rollouts: list[Rollout]) -> dict[int, list[Rollout]]:
    """Rollouts grouped by `prompt_index`, each group in the given order."""
    groups: dict[int, list[Rollout]] = {}
    for rollout in rollouts:
        groups.setdefault(rollout.prompt_index, []).append(rollout)
    return groups


class _OwnShare(DistributedSampler):
    """This rank's batches, in order.

    A `DistributedSampler` of one replica in name only: Lightning splits a training loader's data
    between the processes unless its sampler is distributed, and `train_dataloader` already took
    this rank's share of the round; split again, each rank would train on half of its batches.
    """

    def __init__(self, batches: list[list[Rollout]]) -> None:
        super().__init__(batches, num_replicas=1, rank=0, shuffle=False)


class ResumableLoader(DataLoader):
    """A training loader resumable mid-epoch (Lightning saves and restores its state): the on-policy
    round's, and the offline traces' (`renio_pl.offline.TraceDataModule`).

    Its state is the number of batches already trained this epoch, taken from the fit loop
    rather than counted here (Lightning fetches a batch ahead). After `load_state_dict` the
    next pass skips those batches; `len` stays the whole epoch, as Lightning's counters expect.

    Args:
        batches_done: returns the number of batches the fit loop has trained this epoch.
        *args, **kwargs: `torch.utils.data.DataLoader`'s.
    """

    def __init__(self, batches_done: Callable[[], int], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done, self.skip = batches_done, 0

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["batches_done"]

    def __iter__(self) -> Iterator[RolloutBatch]:
        # A generator: Lightning creates iterators it never draws from, so the skip (and the
        # sampler's shuffle) are taken by the first batch actually drawn, not by `iter()`.
        skip, self.skip = self.skip, 0
        yield from islice(super().__iter__(), skip, None)



class _SampledOnIteration(IterableDataset):
    """Lists of rollouts, sampled anew each time the data set is iterated."""

    def __init__(self, sample: Callable[[], list[Rollout]], batch_size: int) -> None:
        self.sample, self.batch_size = sample, batch_size

    def __iter__(self) -> Iterator[list[Rollout]]:
        rollouts = self.sample()
        for start in range(0, len(rollouts), self.batch_size):
            yield rollouts[start : start + self.batch_size]

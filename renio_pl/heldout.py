"""HeldOutDataModule: held-out prompts and benchmarks, sampled with the current student and graded.

The base both data modules share: the on-policy `OnPolicyDataModule` (`renio_pl.datamodule`)
and the offline `TraceDataModule` (`renio_pl.offline`) add only what they train on. It owns
the student's tokenizer, loading and rendering prompts (`PromptSource`) under the prompt-length
policy, grading (`BatchVerifier`), and the loaders that sample at evaluation time:
`val_dataloader()` for the held-out prompts with the evaluation sampling settings, and
`test_dataloader()` / `predict_dataloader()` for each benchmark in `test_sets`. It provides
what the model reads of its data (`renio_pl.contracts.EvaluationData`).

Every sample's randomness is keyed by (seed, stream, prompt, sample) (`renio_pl.sampling`), so
it is the same whatever the number of processes or batch size.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from renio_pl.contracts import RolloutPolicy
from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import MathVerifier, extract_answer, is_correct
from renio_pl.evaluators.verifier import BatchVerifier
from renio_pl.loaders import SampledOnIteration
from renio_pl.models import load_tokenizer
from renio_pl.paths import InputPath
from renio_pl.prompt_format import PromptFormat
from renio_pl.prompt_source import PromptSource
from renio_pl.prompts import PromptRow
from renio_pl.rollouts import HFGenerator, Rollout, RolloutGenerator, SamplingConfig
from renio_pl.sampling import stream_key

__all__ = ["EvalSet", "HeldOutDataModule", "data_seed", "require_positive"]

_VALIDATION_STREAM = "validation"  # names the random streams of validation samples


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

    def source(self, option: str, prompt_format: PromptFormat) -> PromptSource:
        """This benchmark's problems, read from the config key `option`; `prompt_format` unless it has its own."""
        return PromptSource(
            self.path, option, self.prompt_field, self.answer_field, self.answer_after, self.split, self.subset,
            self.prompt_format or prompt_format,
        )


def data_seed(seed: int | None) -> int:
    """`seed`, or when None the global seed `seed_everything` set (Lightning's `PL_GLOBAL_SEED`; 0 when unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


def require_positive(**values: int) -> None:
    """Refuse the first `data.<name>` under 1, in one line."""
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"data.{name} must be >= 1; got {value}")


class HeldOutDataModule(pl.LightningDataModule):
    """Held-out prompts and benchmarks, sampled with the current student when iterated, and graded.

    Not a data module to train with by itself: `OnPolicyDataModule` and `TraceDataModule` add
    the training data, and document these arguments as their options.

    Args:
        tokenizer: the student's tokenizer (hub id or folder).
        val_source: the held-out prompts, or None.
        prompt_format: the data's prompt format; benchmarks without their own use it.
        engine: the rollout engine.
        val_sampling: held-out samples.
        test_sets: benchmarks for `test` and `predict`.
        test_sampling: their samples: `n` is the k of Avg@k.
        val_batch_size: rollouts per validation, test or predict batch.
        max_prompt_tokens: longest rendered prompt; longer ones are handled per `long_prompts`.
        long_prompts: `error` stops with a message; `drop` skips them (and logs how many).
        verifier: `(completion, answer) -> bool`; with `answer_extractor` it makes the
            `MathVerifier` that grades every rollout whose test set has no verifier.
        answer_extractor: `completion -> final answer or None`, for majority voting.
        seed: seeds the samples (None: the global seed, `data_seed`).
    """

    solution_field: str | None = None  # EvaluationData: OPSD data (`OnPolicyDataModule`) sets it

    def __init__(
        self,
        tokenizer: str | None,
        val_source: PromptSource | None = None,
        prompt_format: PromptFormat = PromptFormat(),
        engine: RolloutGenerator = lazy_instance(HFGenerator),
        val_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0),
        test_sets: list[EvalSet] | None = None,
        test_sampling: SamplingConfig = SamplingConfig(n=12, temperature=1.0, top_p=0.95),
        val_batch_size: int = 64,
        max_prompt_tokens: int = 2048,
        long_prompts: Literal["error", "drop"] = "error",
        verifier: Callable[[str, str], bool] = is_correct,
        answer_extractor: Callable[[str], str | None] = extract_answer,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        require_positive(val_batch_size=val_batch_size, max_prompt_tokens=max_prompt_tokens)
        if long_prompts not in ("error", "drop"):
            raise ConfigError(f"data.long_prompts must be error or drop; got {long_prompts!r}")
        if tokenizer is None:
            raise ConfigError("data.tokenizer is missing: give the student's hub id or folder (the CLI links model.student)")
        self.val_source, self.prompt_format = val_source, prompt_format
        self.engine = engine
        self.val_sampling, self.test_sets, self.test_sampling = val_sampling, list(test_sets or []), test_sampling
        names = [s.name for s in self.test_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.test_sets: names must differ; got {names}")
        if any(s.limit < 0 for s in self.test_sets):
            raise ConfigError("data.test_sets: limit must be >= 0 (0: every problem)")
        self.val_batch_size, self.max_prompt_tokens, self.long_prompts = val_batch_size, max_prompt_tokens, long_prompts
        self.seed = data_seed(seed)
        self.default_verifier: BatchVerifier = MathVerifier(verifier, answer_extractor)  # sets without their own
        self.tokenizer = load_tokenizer(tokenizer)
        self.val_rows: list[PromptRow] = []
        self.val_prompt_ids: list[list[int]] = []
        self.test_rows: dict[str, tuple[list[PromptRow], list[list[int]]]] = {}
        self.test_verifiers = {s.name: s.verifier for s in self.test_sets}
        self.dropped_prompts = 0

    def setup(self, stage: str) -> None:
        """Load the held-out prompts (fit, validate) or the benchmarks (test, predict), once."""
        if stage in ("fit", "validate") and self.val_source is not None and not self.val_rows:
            self.val_rows, self.val_prompt_ids, _ = self._prepare(self.val_source, self.val_sampling, "data.val_sampling")
        if stage in ("test", "predict") and not self.test_rows:
            if not self.test_sets:
                command = "test" if stage == "test" else "predict"
                raise ConfigError(f"{command} needs benchmarks: set data.test_sets (see configs/eval/)")
            for i, eval_set in enumerate(self.test_sets):
                source = eval_set.source(f"data.test_sets[{i}].path", self.prompt_format)
                rows, ids, _ = self._prepare(source, self.test_sampling, "data.test_sampling")
                end = eval_set.limit or len(rows)
                self.test_rows[eval_set.name] = rows[:end], ids[:end]

    def _prepare(
        self, source: PromptSource, sampling: SamplingConfig, sampling_option: str
    ) -> tuple[list[PromptRow], list[list[int]], list[list[int]] | None]:
        """Load `source`'s rows and render their prompts (and the teacher's, for OPSD), applying the prompt-length policy.

        With an answer field, records whose answer is missing or empty are dropped and
        counted (in `dropped_prompts`, logged as `data/dropped_prompts`). A prompt is too
        long past `max_prompt_tokens`, or when it and `sampling.max_new_tokens` (the config
        key `sampling_option`) do not fit in the student's context (`max_position_embeddings`);
        for OPSD the teacher's prompt is held to the same limit.
        """
        option = source.option
        rows = source.load_rows()
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
        answered = [row for row in rows if source.answer_field is None or row.answer]
        if len(answered) < len(rows):  # a batch is labelled only when every rollout has an answer
            first = next(row.index for row in rows if not row.answer)
            rank_zero_info(f"{option}: dropped {len(rows) - len(answered)} records without an answer (first: record {first})")
            self.dropped_prompts += len(rows) - len(answered)
            rows = answered
        kept_rows, kept_ids, kept_teacher_ids = [], [], []
        for row in rows:
            ids, teacher_ids = source.render(self.tokenizer, row)
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
        return kept_rows, kept_ids, kept_teacher_ids if source.solution_field is not None else None

    def _student_context(self) -> int | None:
        """The student's `max_position_embeddings`, when a trainer with our module is attached."""
        policy = self._policy()
        config = getattr(policy.student, "config", None) if policy is not None else None  # a Hugging Face config
        return getattr(config, "max_position_embeddings", None)

    def _policy(self) -> RolloutPolicy | None:
        """The attached model, when it provides `RolloutPolicy` (the student rollouts are sampled from)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return module if isinstance(module, RolloutPolicy) else None

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
        return DataLoader(SampledOnIteration(sample, self.val_batch_size), batch_size=None)

"""TraceDataModule: offline teacher traces in, (prompt, positive[, negative]) training batches out.

REDI trains on fixed traces, so nothing is sampled for training: `setup("fit")` reads the
trace records once (a jsonl / parquet file or a hub data set id, column names configurable),
renders each prompt through the same `PromptFormat` / `render_prompt` as the on-policy path,
tokenises each completion and holds them to the length limits. `stage` picks what is served:

- `sft` (REDI stage 1): one (prompt, positive) pair per record, so a problem with several
  positives (several records) is served once per positive;
- `redi` (stage 2): one (prompt, positive, negative) triplet per record.

Validation, test and predict are the shared held-out base's (`renio_pl.heldout.HeldOutDataModule`),
as in on-policy distillation: held-out prompts sampled by the engine with the current student
and graded by the verifier.

Shapes use the package glossary (`renio_pl/__init__.py`): `B` records in a batch, `R` rows (`B`, or `2B` with
negatives), `T_prompt` the padded prompt width, `T` completion tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from renio_pl.heldout import EvalSet, HeldOutDataModule, require_positive
from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import extract_answer, is_correct
from renio_pl.loaders import ResumableLoader, trained_batches
from renio_pl.losses import TraceLoss
from renio_pl.paths import InputPath
from renio_pl.prompt_format import PromptFormat, render_prompt
from renio_pl.prompt_source import PromptSource
from renio_pl.prompts import load_table, read_prompt, require_columns, where
from renio_pl.rollouts import HFGenerator, Rollout, RolloutBatch, RolloutGenerator, SamplingConfig, collate_rollouts
from renio_pl.sampling import stream_key

__all__ = ["Trace", "TraceBatch", "collate_traces", "trace_stage", "TraceDataModule"]

Stage = Literal["sft", "redi"]


def trace_stage(objective: TraceLoss) -> Stage:
    """The stage whose records `objective` trains on: `redi` when it needs negatives, else `sft`."""
    return "redi" if objective.needs_negatives else "sft"


@dataclass
class Trace:
    """One training record, tokenised.

    Attributes:
        index: the record's position in its data set.
        prompt_ids: the rendered prompt's token ids.
        positive_ids: the positive completion's ids, ending with EOS.
        negative_ids: the negative completion's ids, ending with EOS (stage `redi`), or None.
    """

    index: int
    prompt_ids: list[int]
    positive_ids: list[int]
    negative_ids: list[int] | None = None


@dataclass
class TraceBatch:
    """A training micro-batch of traces.

    Attributes:
        completions: the `B` positives, then (stage `redi`) the `B` negatives in the same
            order, laid out as rollouts: `input_ids` (R, T_prompt + T), `completion_mask` (R, T).
        pairs: `B`.
    """

    completions: RolloutBatch
    pairs: int

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """(R, ...) -> the positives' rows (B, ...) and the negatives' rows (B, ...), or None without negatives."""
        if rows.shape[0] == self.pairs:
            return rows, None
        return rows[: self.pairs], rows[self.pairs :]


def collate_traces(traces: list[Trace], pad_token_id: int) -> TraceBatch:
    """Lay out positives (then negatives) as one `RolloutBatch`: one forward pass scores both."""
    rollouts = [Rollout(t.prompt_ids, t.positive_ids, t.index, temperature=1.0) for t in traces]
    rollouts += [Rollout(t.prompt_ids, t.negative_ids, t.index, temperature=1.0) for t in traces if t.negative_ids is not None]
    if len(rollouts) not in (len(traces), 2 * len(traces)):
        raise ValueError("a batch must give every trace a negative completion or none")
    return TraceBatch(collate_rollouts(rollouts, pad_token_id), len(traces))


class TraceDataModule(HeldOutDataModule):
    """Teacher traces for REDI's two stages; held-out accuracy as in on-policy distillation.

    Args:
        train_path: the traces: a jsonl / parquet file or a hub data set id (needed to fit),
            e.g. `sft.jsonl` or `redi.jsonl` written by `renio-pl-redi-traces`.
        tokenizer: the student's tokenizer (hub id or folder); linked from `model.student`.
        stage: `sft` serves (prompt, positive) pairs, `redi` (prompt, positive, negative) triplets;
            it must match the model's objective (`needs_negatives`). `renio-pl-redi` sets it from
            `model.objective`, so it is not an option there.
        val_path: held-out prompts with answers for validation accuracy, or None.
        prompt_field: column holding the problem text (in the traces and the held-out prompts).
        positive_field: column holding the positive (correct) completion text.
        negative_field: column holding the negative (incorrect) completion text; read in stage `redi`.
        answer_field: column holding the held-out prompts' reference answers.
        answer_after: keep only the text after the last occurrence of this marker in each
            held-out answer (GSM8K: `####`); empty keeps the whole answer.
        split: split of a hub data set.
        prompt_format: the template, system message and chat-template variables that turn a
            problem into the prompt (the one the traces were sampled with).
        engine: the rollout engine for validation, test and predict.
        val_sampling: held-out samples (default: one greedy completion per prompt).
        test_sets: benchmarks for `test` and `predict`.
        test_sampling: their samples: `n` is the k of Avg@k.
        batch_size: records per training micro-batch (each brings its negative in stage `redi`).
        val_batch_size: rollouts per validation, test or predict batch.
        max_prompt_tokens: longest rendered prompt (traces and held-out prompts).
        max_completion_tokens: longest completion, EOS included.
        long_traces: a trace over a limit (or whose prompt and completion overflow the
            student's context): `error` stops with a message, `drop` skips the record (counted
            in `dropped_traces`, logged as `data/dropped_traces`).
        verifier: `(completion, answer) -> bool` grading held-out samples, an import path in YAML.
        answer_extractor: `completion -> final answer or None`, for majority voting.
        seed: seeds the order of the records (with the epoch) and the held-out samples.
    """

    def __init__(
        self,
        train_path: InputPath | None = None,
        tokenizer: str | None = None,
        stage: Stage = "sft",
        val_path: InputPath | None = None,
        prompt_field: str = "prompt",
        positive_field: str = "positive",
        negative_field: str = "negative",
        answer_field: str | None = "answer",
        answer_after: str = "",
        split: str = "train",
        prompt_format: PromptFormat = PromptFormat(),
        engine: RolloutGenerator = lazy_instance(HFGenerator),
        val_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0),
        test_sets: list[EvalSet] | None = None,
        test_sampling: SamplingConfig = SamplingConfig(n=12, temperature=1.0, top_p=0.95),
        batch_size: int = 8,
        val_batch_size: int = 64,
        max_prompt_tokens: int = 2048,
        max_completion_tokens: int = 4096,
        long_traces: Literal["error", "drop"] = "error",
        verifier: Callable[[str, str], bool] = is_correct,
        answer_extractor: Callable[[str], str | None] = extract_answer,
        seed: int = 0,
    ) -> None:
        if stage not in ("sft", "redi"):
            raise ConfigError(f"data.stage must be sft or redi; got {stage!r}")
        if long_traces not in ("error", "drop"):
            raise ConfigError(f"data.long_traces must be error or drop; got {long_traces!r}")
        require_positive(max_completion_tokens=max_completion_tokens, batch_size=batch_size)
        described = partial(
            PromptSource, prompt_field=prompt_field, answer_field=answer_field, answer_after=answer_after, split=split,
            prompt_format=prompt_format,
        )
        super().__init__(
            tokenizer, val_source=None if val_path is None else described(val_path, "data.val_path"),
            prompt_format=prompt_format, engine=engine, val_sampling=val_sampling, test_sets=test_sets,
            test_sampling=test_sampling, val_batch_size=val_batch_size, max_prompt_tokens=max_prompt_tokens,
            verifier=verifier, answer_extractor=answer_extractor, seed=seed,
        )
        # the traces: their prompts are read and rendered as the held-out ones are (no answer column needed)
        self.trace_source = None if train_path is None else described(train_path, "data.train_path")
        self.batch_size, self.stage = batch_size, stage
        self.positive_field, self.negative_field = positive_field, negative_field
        self.max_completion_tokens, self.long_traces = max_completion_tokens, long_traces
        self.traces: list[Trace] = []
        self.dropped_traces = 0

    def setup(self, stage: str) -> None:
        if stage == "fit":
            if self.trace_source is None:
                raise ConfigError(
                    "fit needs traces: set data.train_path to a .jsonl / .parquet file or a hub id "
                    "(renio-pl-redi-traces writes one)"
                )
            self._check_model()
            if not self.traces:
                self.traces = self.load_traces()
        super().setup(stage)  # the held-out prompts and benchmarks

    def _check_model(self) -> None:
        """Refuse a model that cannot train on this stage's records, before any trace is read.

        A model trains on traces when its `objective` is a `TraceLoss`; `trace_stage` says on
        which stage's records.
        """
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None:
            return
        if not isinstance(getattr(model, "objective", None), TraceLoss):
            raise ConfigError(
                f"data: TraceDataModule serves offline traces, which {type(model).__name__} does not train on; "
                "use renio_pl.offline.OfflineDistillationModule (renio-pl-redi fit)"
            )
        objective, needed = type(model.objective).__name__, trace_stage(model.objective)
        if needed == self.stage:
            return
        if needed == "redi":
            raise ConfigError(
                f"model.objective {objective} needs a negative trace for every positive, but data.stage is "
                f"{self.stage!r}: build TraceDataModule with stage='redi' (renio-pl-redi sets it from "
                "model.objective), or use renio_pl.losses.SFTLoss"
            )
        raise ConfigError(
            f"model.objective {objective} trains on positive traces alone, but data.stage is 'redi': "
            "build TraceDataModule with stage='sft' (it reads the positives of a redi file too; renio-pl-redi "
            "sets it from model.objective), or use renio_pl.losses.REDILoss"
        )

    # --- reading the traces ------------------------------------------------------------------
    def load_traces(self) -> list[Trace]:
        """Read, render and tokenise the records of `train_path`, applying the length policy."""
        source = self.trace_source
        option = source.option
        table = load_table(source.path, source.split, option, source.subset)
        fields = {"prompt_field": source.prompt_field, "positive_field": self.positive_field}
        if self.stage == "redi":
            fields["negative_field"] = self.negative_field
        require_columns(table, source.path, option, fields)
        columns = {key: table[name] for key, name in fields.items()}
        for key in ("positive_field", "negative_field"):
            missing = next((i for i, text in enumerate(columns.get(key, [])) if text is None), None)
            if missing is not None:  # an empty string is a completion (EOS alone); a null is no completion
                what = "positive" if key == "positive_field" else "negative"
                raise ConfigError(
                    f"{option}: record {missing} of {source.path} has no {what} trace in column "
                    f"{fields[key]!r} (data.{key}); remove the record or fill it in"
                )
        prompts = self._render_prompts([
            read_prompt(p, where(table, i, source.path), option, source.prompt_field)
            for i, p in enumerate(columns["prompt_field"])
        ])
        positives = self._tokenize_completions(columns["positive_field"])
        negatives = self._tokenize_completions(columns["negative_field"]) if self.stage == "redi" else None
        traces = []
        for i, prompt_ids in enumerate(prompts):
            trace = Trace(i, prompt_ids, positives[i], None if negatives is None else negatives[i])
            problem = self._overflow(trace)
            if problem is None:
                traces.append(trace)
            elif self.long_traces == "error":
                raise ConfigError(
                    f"{option}: record {i} has {problem}; shorten it, raise the limit, or set data.long_traces=drop"
                )
            else:
                self.dropped_traces += 1
        if not traces:
            raise ConfigError(
                f"{option}: every record is over the length limits (data.max_prompt_tokens={self.max_prompt_tokens}, "
                f"data.max_completion_tokens={self.max_completion_tokens}, or the student's context)"
            )
        rank_zero_info(f"{option}: {len(traces)} {self.stage} records ({self.dropped_traces} dropped for length)")
        return traces

    def _render_prompts(self, prompts: list[tuple[str, list[dict[str, str]] | None]]) -> list[list[int]]:
        """Prompt ids per record (problem, messages); a prompt shared by several records (SFT positives) is rendered once."""
        rendered: dict[str, list[int]] = {}
        keys = [json.dumps(prompt) for prompt in prompts]
        for key, (problem, messages) in zip(keys, prompts):
            if key not in rendered:
                rendered[key] = render_prompt(self.tokenizer, problem, self.trace_source.prompt_format, messages=messages)
        return [rendered[key] for key in keys]

    def _tokenize_completions(self, texts: list[str]) -> list[list[int]]:
        """Completion ids per text, each ending with the tokenizer's EOS (appended unless the text ends with it)."""
        eos = self.tokenizer.eos_token_id
        ids_per_text = self.tokenizer([str(t) for t in texts], add_special_tokens=False)["input_ids"]
        return [ids if ids and ids[-1] == eos else [*ids, eos] for ids in ids_per_text]

    def _overflow(self, trace: Trace) -> str | None:
        """What puts the trace over a length limit, or None when it fits."""
        prompt = len(trace.prompt_ids)
        if prompt > self.max_prompt_tokens:
            return f"a {prompt}-token prompt, over data.max_prompt_tokens={self.max_prompt_tokens}"
        context = self._student_context()
        for name, ids in (("positive", trace.positive_ids), ("negative", trace.negative_ids)):
            if ids is None:
                continue
            if len(ids) > self.max_completion_tokens:
                return (
                    f"a {len(ids)}-token {name} completion (EOS included), over "
                    f"data.max_completion_tokens={self.max_completion_tokens}"
                )
            if context is not None and prompt + len(ids) > context:
                return f"{prompt + len(ids)} tokens of prompt and {name} completion, over the student's context {context}"
        return None

    # --- serving -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """The records in an order keyed by (seed, epoch); resumable mid-epoch like the on-policy rounds."""
        order = torch.Generator().manual_seed(stream_key(self.seed, self.trainer.current_epoch))
        return ResumableLoader(
            partial(trained_batches, self.trainer), self.traces, batch_size=self.batch_size, shuffle=True, generator=order,
            collate_fn=self._collate_traces,
        )

    def _collate_traces(self, traces: list[Trace]) -> TraceBatch:
        return collate_traces(traces, self.tokenizer.pad_token_id)

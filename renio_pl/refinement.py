"""Trajectory refinement (TRD): each student rollout is rewritten whole before it is scored.

Between stage 2 (rollouts) and stage 3 (log-probs) of the data flow. For every rollout `y_o`
the `Refiner` renders a rewrite prompt (the problem, the attempt `y_o` and, for OPSD, the
reference solution), has the rewriter sample one rewrite `y_r`, and returns a rollout whose
completion is `y_r`: the student scores `x + y_r` after its own prompt `x`, and the teacher
scores the same tokens after the rewrite prompt (`Rollout.teacher_prompt_ids`), which is
exactly what the rewriter generated them after. The rewriter is the teacher the module scores
with (`DistillationModule.teaching`): the OPD teacher, or for OPSD the student's base weights.
Method: TRD (Jiang, Xu, Ding, Zhang, arXiv 2606.08432); method.md, "TRD".

Shapes use the package glossary (`renio_pl/__init__.py`): `B` rollouts, `T` completion tokens.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from string import Formatter
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from renio_pl.contracts import Teaching
from renio_pl.errors import ConfigError
from renio_pl.prompt_format import PromptFormat, render_prompt
from renio_pl.prompts import PromptRow
from renio_pl.rollouts import HFGenerator, Rollout, RolloutGenerator, SamplingConfig

__all__ = ["Refiner", "TRD_OPD_TEMPLATE", "TRD_OPSD_TEMPLATE", "refinement_counts", "refinement_metrics"]

log = logging.getLogger(__name__)

# The rewrite prompts, after the TRD authors' (read, not copied): rewrite the whole attempt, keep
# its structure and correct steps, fix the errors, output only the rewritten solution; for OPSD
# the reference solution guides the rewrite.
TRD_OPD_TEMPLATE = (
    "Rewrite your solution to the problem below.\n\n"
    "Problem:\n{problem}\n\n"
    "Your solution:\n{attempt}\n\n"
    "Keep the structure and line of reasoning of your solution and the steps that are correct; find and fix "
    "the errors in computation or logic. Output only the rewritten solution, and put your final answer within "
    "\\boxed{{}}."
)
TRD_OPSD_TEMPLATE = (
    "Rewrite your solution to the problem below, using the reference solution as guidance.\n\n"
    "Problem:\n{problem}\n\n"
    "Reference solution:\n{solution}\n\n"
    "Your solution:\n{attempt}\n\n"
    "Understand the reasoning and method of the reference solution and make your solution consistent with it, "
    "keeping the useful parts of your own structure and style. Output only the rewritten solution, and put your "
    "final answer within \\boxed{{}}."
)
_FIELDS = {"problem", "attempt", "solution"}


class Refiner:
    """Rewrites each rollout whole with the teacher, so that the loss is taken on the rewrite (TRD).

    The refined rollouts are graded again (`correct` is the verdict on `y_r`, the trajectory
    that is trained on), and scored at `score_temperature` whatever the rewriter sampled at.

    Args:
        prompt_format: the rewrite prompt: a template with `{problem}`, `{attempt}` (the
            rollout's decoded text) and, for OPSD, `{solution}`; None uses `TRD_OPD_TEMPLATE`,
            or `TRD_OPSD_TEMPLATE` when `data.solution_field` is set. Without `{attempt}` the
            rewriter solves each problem afresh. Keep its thinking setting
            (`chat_template_kwargs`) the student's, so that `y_r` fits after the student's prompt.
        sampling: how the rewriter samples: one rewrite per rollout (`n` 1) of at most
            `data.sampling.max_new_tokens` tokens (`y_r` is trained as the student's response).
            The default is the authors' T 0.6, top_p 0.95, top_k 20.
        schedule: `once`, the authors' single update: the initial student samples the whole
            training set, each rollout is refined once, and the rounds serve that fixed set;
            `every_round`: each round is sampled by the current student and refined (on-policy).
        engine: the rewriter's engine; None uses `data.engine`. An OPD teacher needs one of its
            own when `data.engine` is vLLM (that engine holds the student's architecture): a
            second `VLLMGenerator` (built from the teacher) or `HFGenerator`.
        score_temperature: the temperature the refined tokens are scored at (TRD: 1).
    """

    def __init__(
        self,
        prompt_format: PromptFormat | None = None,
        sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20),
        schedule: Literal["once", "every_round"] = "once",
        engine: RolloutGenerator | None = None,
        score_temperature: float = 1.0,
    ) -> None:
        prefix = "data.refiner.init_args"
        if prompt_format is not None:
            fields = _fields(prompt_format.template)
            if not fields <= _FIELDS:
                raise ConfigError(
                    f"{prefix}.prompt_format.template may use {{problem}}, {{attempt}} and {{solution}}; "
                    f"got {', '.join(sorted(fields - _FIELDS))}"
                )
            if "attempt" not in fields:
                log.info("data.refiner: the rewrite prompt has no {attempt}: the rewriter solves each problem afresh")
        if sampling.n != 1:
            raise ConfigError(f"{prefix}.sampling.n must be 1 (one rewrite per rollout); got {sampling.n}")
        if schedule not in ("once", "every_round"):
            raise ConfigError(f"{prefix}.schedule must be once or every_round; got {schedule!r}")
        if score_temperature <= 0:
            raise ConfigError(f"{prefix}.score_temperature must be > 0; got {score_temperature}")
        self.prompt_format, self.sampling, self.schedule = prompt_format, sampling, schedule
        self.engine, self.score_temperature = engine, score_temperature

    def check_data(self, solution_field: str | None, sampling: SamplingConfig) -> None:
        """Refuse a rewrite prompt that does not match the data, or rewrites longer than the rollouts."""
        prefix = "data.refiner.init_args"
        if self.sampling.max_new_tokens > sampling.max_new_tokens:
            raise ConfigError(
                f"{prefix}.sampling.max_new_tokens={self.sampling.max_new_tokens} is over "
                f"data.sampling.max_new_tokens={sampling.max_new_tokens}: y_r is trained as the student's response; "
                "lower it"
            )
        if self.prompt_format is None:
            return
        with_solution = "solution" in _fields(self.prompt_format.template)
        if with_solution and solution_field is None:
            raise ConfigError(
                f"{prefix}.prompt_format.template has {{solution}}, but the data has none: set data.solution_field "
                "(OPSD) or drop {solution}"
            )
        if solution_field is not None and not with_solution:
            raise ConfigError(
                f"{prefix}.prompt_format.template must contain {{solution}} for OPSD (data.solution_field is set): "
                "its rewriter reads the reference solution"
            )

    def check_model(self, module: Teaching, data_engine: RolloutGenerator) -> None:
        """Refuse the loss, weighter or engine a refined trajectory does not work with.

        `y_r` is sampled by the rewriter, not the student: estimators that read the student's
        own sampled tokens as draws from `pi_S` do not apply (`SampledReverseKL`'s policy
        gradient, `ReNIOWeighter`'s log-ratio spikes where the student chose a token the
        teacher rejects). Full-vocabulary losses are divergences at each position of `y_r`
        and need no such assumption.
        """
        if not isinstance(module, Teaching):
            raise ConfigError(
                f"data.refiner: the model ({type(module).__name__}) does not provide what the rewriter reads "
                "(renio_pl.contracts.Teaching: teaching(), separate_teacher, loss, weighter); use "
                "renio_pl.module.DistillationModule or drop data.refiner"
            )
        if module.loss.needs_own_samples:
            raise ConfigError(
                f"model.loss: {type(module.loss).__name__} {module.loss.own_samples_reason}, but data.refiner trains on "
                "the rewriter's y_r; use a full-vocabulary loss (ForwardKL, as TRD)"
            )
        if module.weighter.needs_own_samples:
            raise ConfigError(
                f"model.weighter: {type(module.weighter).__name__} {module.weighter.own_samples_reason}, but data.refiner "
                "trains on the rewriter's y_r; use UniformWeighter (as TRD), LengthWeighter, EntropyWeighter or "
                "OracleWeighter (labels graded on y_r)"
            )
        if module.separate_teacher and self.engine is None and not isinstance(data_engine, HFGenerator):
            raise ConfigError(
                "data.refiner.init_args.engine: the OPD rewriter (model.teacher) needs an engine of its own when "
                "data.engine is not HFGenerator; set it to renio_pl.vllm_engine.VLLMGenerator or "
                "renio_pl.rollouts.HFGenerator"
            )

    def rewrite_prompt(self, tokenizer: PreTrainedTokenizerBase, row: PromptRow, attempt: str) -> list[int]:
        """Token ids of the rewrite prompt of `attempt` (rendered with the chat template, generation prompt on)."""
        prompt_format = self.prompt_format or PromptFormat(TRD_OPD_TEMPLATE if row.solution is None else TRD_OPSD_TEMPLATE)
        fields = {"problem": row.problem, "attempt": attempt, "solution": row.solution}
        text = prompt_format.template.format(**fields)  # braces in the values stay as they are
        return render_prompt(tokenizer, text, replace(prompt_format, template="{problem}"))

    def refine(
        self,
        attempts_B: list[Rollout],
        rows: dict[int, PromptRow],
        rewriter: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        data_engine: RolloutGenerator,
        seeds_B: list[int],
    ) -> list[Rollout]:
        """One rewrite `y_r` of each attempt `y_o`, ungraded.

        Attempts whose rewrite prompt and `sampling.max_new_tokens` do not fit in the
        rewriter's context (`max_position_embeddings`) are left out, with a warning. Call it on
        every process, whatever its attempts: a sharded rewriter samples in step with the others.

        Args:
            attempts_B: the student's rollouts, with their decoded `text`.
            rows: the training rows by `PromptRow.index`.
            rewriter: the model that rewrites: the module's teacher, from `teaching()`.
            data_engine: the rollout engine, used when `engine` is None.
            seeds_B: the random stream of each rewrite.
        Returns:
            A rollout per kept attempt, in order: its prompt, index and answer, `completion_ids`
            the rewrite, `teacher_prompt_ids` the rewrite prompt, `temperature` `score_temperature`.
        """
        prompts_B = [self.rewrite_prompt(tokenizer, rows[a.prompt_index], a.text) for a in attempts_B]
        context = getattr(rewriter.config, "max_position_embeddings", None)
        kept = [i for i, p in enumerate(prompts_B) if context is None or len(p) + self.sampling.max_new_tokens <= context]
        if len(kept) < len(attempts_B):
            log.warning(
                "data.refiner: left out %d of %d rollouts whose rewrite prompt plus %d new tokens is over the "
                "rewriter's context of %d tokens", len(attempts_B) - len(kept), len(attempts_B),
                self.sampling.max_new_tokens, context,
            )
        engine = self.engine or data_engine  # called even with no prompt: under FSDP every process samples in step
        prompts, seeds = [prompts_B[i] for i in kept], [seeds_B[i] for i in kept]
        rewrites = engine.generate(rewriter, tokenizer, prompts, self.sampling, seeds)
        refined = []
        for i, (rewrite,) in zip(kept, rewrites, strict=True):
            attempt = attempts_B[i]
            text = tokenizer.decode(rewrite, skip_special_tokens=True)
            refined.append(
                Rollout(attempt.prompt_ids, rewrite, attempt.prompt_index, self.score_temperature, attempt.sample_index,
                        attempt.answer, text=text, teacher_prompt_ids=prompts_B[i])
            )
        return refined


def _fields(template: str) -> set[str]:
    """Names of the `{field}`s of a format string (doubled braces are literal text)."""
    return {name for _, name, _, _ in Formatter().parse(template) if name is not None}


def refinement_counts(attempts_B: list[Rollout], refined: list[Rollout]) -> Tensor:
    """Sums describing one refinement, to add up over processes.

    Returns:
        (8,) float64: attempts, rewrites, labelled attempts, correct attempts, labelled rewrites,
        correct rewrites, attempt tokens, rewrite tokens.
    """
    def labels(rollouts: list[Rollout]) -> list[float]:
        return [sum(r.correct is not None for r in rollouts), sum(bool(r.correct) for r in rollouts)]

    tokens = [sum(len(r.completion_ids) for r in rollouts) for rollouts in (attempts_B, refined)]
    return torch.tensor([len(attempts_B), len(refined), *labels(attempts_B), *labels(refined), *tokens], dtype=torch.float64)


def refinement_metrics(counts: Tensor) -> dict[str, float]:
    """`refine/*` metrics from `refinement_counts` (summed): accuracy of `y_o` and `y_r`, lengths, rollouts left out."""
    attempts, rewrites, labelled, correct, labelled_r, correct_r, tokens, tokens_r = counts.tolist()
    metrics = {
        "refine/left_out": attempts - rewrites,
        "refine/attempt_len_mean": tokens / max(attempts, 1),
        "refine/refined_len_mean": tokens_r / max(rewrites, 1),
    }
    if labelled and labelled_r:
        metrics["refine/attempt_accuracy"] = correct / labelled
        metrics["refine/refined_accuracy"] = correct_r / labelled_r
    return metrics

"""Rollouts: the student samples completions for prompts, and they are batched for training.

Stage 2 of the data flow (prompts -> **rollouts** -> log-probs -> weights -> loss).
`RolloutGenerator` is the engine interface; `HFGenerator` runs `transformers` `generate`
(batched, left-padded, seeded). `collate_rollouts` lays a list of `Rollout`s out as a
`RolloutBatch`: each row is the prompt left-padded to the batch's widest prompt `T_prompt`,
followed by the completion right-padded to `T`, so completion token `t` sits at
`T_prompt + t` in every row.

Shapes use the package glossary (`renio_pl/__init__.py`): `P` prompts, `G` samples per prompt,
`B` rollouts, `T` completion tokens, `T_prompt` the padded prompt width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerBase

from renio_pl.errors import ConfigError
from renio_pl.parallel import lockstep_slices
from renio_pl.progress import GenerationProgress
from renio_pl.sampling import KeyedGumbelSampler, stream_key

__all__ = ["SamplingConfig", "Rollout", "RolloutBatch", "collate_rollouts", "RolloutGenerator", "HFGenerator", "eos_token_ids"]


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        n: samples per prompt (`G`).
        temperature: sampling temperature; 0 means greedy. Scoring uses the same value.
        top_p: nucleus mass in (0, 1].
        top_k: keep the k most likely tokens; 0 turns it off.
        max_new_tokens: the longest completion (the prefix length `K` of prefix OPD).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"sampling n must be >= 1; got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"sampling temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling top_k must be >= 0 (0 = off); got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling max_new_tokens must be >= 1; got {self.max_new_tokens}")


@dataclass
class Rollout:
    """One sampled completion with what is known about it.

    Attributes:
        prompt_ids: the rendered prompt's token ids.
        completion_ids: generated ids, up to and including EOS when the model stopped.
        prompt_index: index of the prompt in its data set.
        temperature: the temperature its tokens are scored at: the sampling temperature it was
            drawn with (a rewrite by `renio_pl.refinement.Refiner`: its `score_temperature`).
        sample_index: which of its prompt's `n` samples it is.
        answer: the reference answer, when the data has one.
        correct: the verifier's verdict, when there is an answer.
        text: the decoded completion (special tokens removed).
        final_answer: the answer extracted from `text`, None when there is none.
        teacher_prompt_ids: the teacher's own prompt (OPSD: with the reference solution; TRD:
            the rewrite prompt), or None when the teacher reads the student's prompt.
        verdict: a finer verdict from a batch verifier (code: `pass`, `base:fail`, ...), or None.
        group: its problem's group (`PromptRow.group`), or None.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_index: int
    temperature: float
    sample_index: int = 0
    answer: str | None = None
    correct: bool | None = None
    text: str = ""
    final_answer: str | None = None
    teacher_prompt_ids: list[int] | None = None
    verdict: str | None = None
    group: str | None = None


@dataclass
class RolloutBatch:
    """A training micro-batch of rollouts.

    Attributes:
        input_ids: (B, T_prompt + T) int64, prompts left-padded, completions right-padded.
        attention_mask: (B, T_prompt + T) int64, 0 on padding.
        prompt_length: `T_prompt`, the padded prompt width.
        completion_ids: (B, T) int64 sampled tokens (pad id off the mask).
        completion_mask: (B, T) bool, True on generated tokens.
        temperature: the sampling temperature of these rollouts (> 0; greedy rollouts use 1).
        correct: (B,) float32 1.0 / 0.0 verifier labels, or None when the data has no answers.
        teacher_input_ids: (B, T_teacher_prompt + T) int64, the teacher's prompts laid out the same way in
            front of the same completions, or None when the teacher reads `input_ids`.
        teacher_attention_mask: (B, T_teacher_prompt + T) int64, or None.
        teacher_prompt_length: `T_teacher_prompt`, or None.
        texts: the B decoded completions (`Rollout.text`), read by the diagnostics (epistemic
            markers), or None.
        groups: the B problems' groups (`Rollout.group`, None for none), read by the diagnostics, or None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_length: int
    completion_ids: Tensor
    completion_mask: Tensor
    temperature: float
    correct: Tensor | None = None
    teacher_input_ids: Tensor | None = None
    teacher_attention_mask: Tensor | None = None
    teacher_prompt_length: int | None = None
    texts: list[str] | None = None
    groups: list[str | None] | None = None

    def teacher_inputs(self) -> tuple[Tensor, Tensor, int]:
        """(input_ids, attention_mask, prompt_length) the teacher scores the completions after."""
        if self.teacher_input_ids is None:
            return self.input_ids, self.attention_mask, self.prompt_length
        return self.teacher_input_ids, self.teacher_attention_mask, self.teacher_prompt_length


def _layout(prompts_B: list[list[int]], completions_B: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor, int]:
    """(B, T_prompt + T) ids and attention mask, prompts left-padded to `T_prompt`, completions right-padded to `T`."""
    prompt_width = max(len(p) for p in prompts_B)
    completion_width = max(1, max(len(c) for c in completions_B))
    rows, masks = [], []
    for prompt, completion in zip(prompts_B, completions_B):
        left, right = prompt_width - len(prompt), completion_width - len(completion)
        rows.append([pad_token_id] * left + prompt + completion + [pad_token_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long), prompt_width


def collate_rollouts(rollouts: list[Rollout], pad_token_id: int) -> RolloutBatch:
    """Lay out rollouts as one `RolloutBatch` (prompts left-padded, completions right-padded)."""
    completions = [r.completion_ids for r in rollouts]
    input_ids, attention_mask, prompt_width = _layout([r.prompt_ids for r in rollouts], completions, pad_token_id)
    completion_width = input_ids.shape[1] - prompt_width
    completion_mask = torch.tensor([[t < len(c) for t in range(completion_width)] for c in completions], dtype=torch.bool)
    teacher_prompts = [r.teacher_prompt_ids for r in rollouts]
    if any(p is None for p in teacher_prompts) and any(p is not None for p in teacher_prompts):
        raise ValueError("a batch must give every rollout a teacher prompt or none")
    teacher = (None, None, None)
    if teacher_prompts[0] is not None:
        teacher = _layout(teacher_prompts, completions, pad_token_id)
    temperatures = {r.temperature for r in rollouts}
    if len(temperatures) != 1:
        raise ValueError(f"a batch must share one sampling temperature; got {sorted(temperatures)}")
    labels = [r.correct for r in rollouts]
    correct = None if any(c is None for c in labels) else torch.tensor(labels, dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_length=prompt_width,
        completion_ids=input_ids[:, prompt_width:],
        completion_mask=completion_mask,
        temperature=temperatures.pop() or 1.0,
        correct=correct,
        teacher_input_ids=teacher[0],
        teacher_attention_mask=teacher[1],
        teacher_prompt_length=teacher[2],
        texts=[r.text for r in rollouts],
        groups=[r.group for r in rollouts],
    )


class RolloutGenerator(ABC):
    """A rollout engine: samples completions of token-id prompts from a policy."""

    @abstractmethod
    def generate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts_P: list[list[int]],
        sampling: SamplingConfig,
        seeds_P: list[int],
    ) -> list[list[list[int]]]:
        """Sample `sampling.n` completions per prompt with the model's current weights.

        Sample `j` of prompt `i` draws from the random stream `stream_key(seeds_P[i], j)`
        (`renio_pl.sampling`), so it does not depend on the batch it is generated in.

        With several processes every process calls it as often, `prompts_P` maybe empty: an
        engine whose sampling gathers a sharded model's weights keeps the processes in step.

        Returns:
            `completions_P_G`: token ids per prompt and sample, each ending at (and including)
            the first EOS, or `max_new_tokens` long when the model did not stop.
        """


class HFGenerator(RolloutGenerator):
    """`transformers` `generate`: batched, left-padded, keyed sampling; always available.

    Sampling is exactly what `SamplingConfig` says: the checkpoint's own
    `generation_config.json` (Qwen3 ships temperature 0.6, top_k 20) is set aside while
    generating, so the tokens are drawn from the distribution the loss scores them under.

    Under FSDP every process makes as many `generate` calls: one with fewer chunks of
    `batch_size` prompts than another (none, even) makes up the difference with calls on a
    throwaway prompt (`renio_pl.parallel.lockstep_slices`).

    Args:
        batch_size: prompts per `generate` call (each expands to `n` sequences).
    """

    def __init__(self, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.engine.init_args.batch_size must be >= 1; got {batch_size}")
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts_P: list[list[int]],
        sampling: SamplingConfig,
        seeds_P: list[int],
    ) -> list[list[list[int]]]:
        if len(seeds_P) != len(prompts_P):
            raise ValueError(f"one seed per prompt: {len(prompts_P)} prompts, {len(seeds_P)} seeds")
        eos_ids = eos_token_ids(model, tokenizer)
        config = GenerationConfig(
            do_sample=False,  # sampling is greedy decoding of Gumbel-perturbed logits (KeyedGumbelSampler)
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
        )
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        completions_P_G: list[list[list[int]]] = []
        # counts finished completions during each generate call (renio_pl.progress); off for a single short call
        progress = GenerationProgress(len(prompts_P) * sampling.n, eos_ids, disable=len(prompts_P) * sampling.n < 64)
        try:
            with _own_generation_config(model, config), progress:
                for chunk in lockstep_slices(len(prompts_P), self.batch_size, model):
                    if chunk.start == chunk.stop:  # the other processes' extra call: same steps, output unused
                        _generate_discarded(model, tokenizer, config, device)
                        continue
                    rows = [p for p in prompts_P[chunk] for _ in range(sampling.n)]  # prompt-major: row i * n + j
                    keys = [stream_key(seed, j) for seed in seeds_P[chunk] for j in range(sampling.n)]
                    width = max(len(p) for p in prompts_P[chunk])
                    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in rows], device=device)
                    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
                    processors = LogitsProcessorList([progress])
                    progress.start_call(width)
                    if sampling.temperature > 0:
                        processors.append(
                            KeyedGumbelSampler(
                                torch.tensor(keys, device=device), width, sampling.temperature, sampling.top_k, sampling.top_p
                            )
                        )
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                        logits_processor=processors,
                    )
                    sequences = output[:, width:].tolist()  # (len(chunk) * n, <= max_new_tokens)
                    for i in range(chunk.stop - chunk.start):
                        group = sequences[i * sampling.n : (i + 1) * sampling.n]
                        completions_P_G.append([_cut_at_eos(s, eos_ids) for s in group])
                    progress.finish_call([c for group in completions_P_G[chunk] for c in group])
        finally:
            model.train(was_training)
        return completions_P_G


def _generate_discarded(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig, device: torch.device
) -> None:
    """One `generate` call on a one-token throwaway prompt, (1, 1), whose output is dropped.

    Under FSDP it keeps this process in step with one that has a chunk of prompts more
    (`renio_pl.parallel.lockstep_slices`): `synced_gpus` runs it for as many decoding steps.
    """
    prompt = torch.tensor([[tokenizer.pad_token_id]], device=device)
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


@contextmanager
def _own_generation_config(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """Stand `config` in for the checkpoint's generation config, whose values would fill its unset fields."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps the HF one
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model's generation config, else the tokenizer's."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_eos if config_eos is not None else tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise ConfigError("the student has no EOS token (generation_config.eos_token_id or tokenizer.eos_token)")
    return ids


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """Tokens up to and including the first EOS; all of them when there is none."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens

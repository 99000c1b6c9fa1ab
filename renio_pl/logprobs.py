"""Scoring: log-probs, entropy and token losses of the sampled completion tokens.

Stage 3 of the data flow (rollouts -> **log-probs** -> weights -> loss). Both models see the
same completion tokens after their own prompt; logits come from
`log_softmax(logits / temperature)` with the rollout's sampling temperature.

Memory: the decoders return hidden states `(B, L, H)`; logits are made from them only for
`chunk_tokens` generated positions at a time, inside activation checkpointing, so neither the
forward nor the backward ever holds `(B, T, V)` float logits for the whole batch. Under FSDP
the student's output head runs as many chunks on every process (`renio_pl.parallel.lockstep_slices`):
a process with fewer generated tokens than another runs it on empty chunks.

Shapes use the package glossary (`renio_pl/__init__.py`): `B` rollouts, `T` completion tokens, `T_prompt` the padded
prompt width, `L = T_prompt + T`, `N` the batch's completion tokens packed, `C` a chunk of them,
`H` hidden size, `V` vocabulary, `k` top-k width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from renio_pl.losses import Loss, TeacherTopK, TopKLoss
from renio_pl.parallel import lockstep_slices

__all__ = [
    "TokenScores", "completion_hidden_states", "score_tokens", "score_tokens_top_k", "token_logprobs", "position_ids",
]


@dataclass
class TokenScores:
    """Per-token results of scoring one batch; all (B, T) float32, 0 off the mask.

    Attributes:
        student_logprobs: log pi_S of each sampled token, detached.
        teacher_logprobs: log pi_T of each sampled token, detached.
        student_entropy: student next-token entropy, detached.
        token_loss: the `Loss` at each position, carrying the student's gradient.
    """

    student_logprobs: Tensor
    teacher_logprobs: Tensor
    student_entropy: Tensor
    token_loss: Tensor


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) int64 positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_hidden_states(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int
) -> Tensor:
    """Hidden states that predict each completion token.

    Args:
        model: a causal LM (`transformers` or a peft wrapper) with `get_decoder()`.
        input_ids: (B, L) int64, prompt left-padded to `prompt_length`, completion right-padded.
        attention_mask: (B, L) 0/1, 0 on padding.
        prompt_length: `T_prompt`, the padded prompt width; completion token `t` sits at `T_prompt + t`.
    Returns:
        (B, T, H): the final hidden state at position `T_prompt - 1 + t`, which predicts token `t`.
    """
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state  # (B, L, H)
    return hidden[:, prompt_length - 1 : -1]


def _score_chunk(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    targets: Tensor,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    temperature: float,
    loss: Loss,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(C, H_S), (C, H_T), (C,) -> four (C,) tensors: loss, student / teacher log-prob, entropy."""
    student_logprobs = torch.log_softmax(student_head(student_hidden).float() / temperature, dim=-1)  # (C, V)
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)  # (C, V)
    token_loss = loss(student_logprobs, teacher_logprobs, targets)
    teacher_sampled = teacher_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return token_loss, *_student_terms(student_logprobs, targets, teacher_sampled)


def _student_terms(student_logprobs: Tensor, targets: Tensor, teacher_sampled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(C, V), (C,), (C,) -> student log-prob of each target, the teacher's, student entropy; all (C,) detached."""
    student_sampled = student_logprobs.gather(-1, targets[:, None]).squeeze(-1).detach()
    probs = student_logprobs.detach().exp()
    entropy = -(probs * student_logprobs.detach()).nan_to_num(nan=0.0).sum(dim=-1)
    return student_sampled, teacher_sampled, entropy


def _score_chunk_top_k(
    student_hidden: Tensor,
    teacher_sampled: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    targets: Tensor,
    student_head: torch.nn.Module,
    temperature: float,
    loss: TopKLoss,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(C, H_S), (C,), (C, k), (C, k), (C,) -> four (C,) tensors: loss, student / teacher log-prob, entropy."""
    student_logprobs = torch.log_softmax(student_head(student_hidden).float() / temperature, dim=-1)  # (C, V)
    teacher = TeacherTopK(teacher_sampled.float(), teacher_ids, teacher_logprobs.float())
    token_loss = loss.forward_top_k(student_logprobs, teacher, targets)
    return token_loss, *_student_terms(student_logprobs, targets, teacher.sampled)


def score_tokens(
    student_hidden: Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: Tensor,
    teacher_head: torch.nn.Module,
    targets: Tensor,
    mask: Tensor,
    temperature: float,
    loss: Loss,
    chunk_tokens: int = 4096,
) -> TokenScores:
    """Score the generated tokens of a batch, `chunk_tokens` positions at a time.

    Args:
        student_hidden: (B, T, H_S) from `completion_hidden_states`, with grad when training.
        student_head: the student's output embedding (`get_output_embeddings()`).
        teacher_hidden: (B, T, H_T), no grad.
        teacher_head: the teacher's output embedding; same vocabulary `V` as the student's.
        targets: (B, T) int64 sampled token ids.
        mask: (B, T) bool, True on generated tokens.
        temperature: the rollout's sampling temperature (> 0).
        loss: the per-token objective.
        chunk_tokens: generated positions turned into logits at once.
    Returns:
        `TokenScores`, each (B, T) float32.
    """
    return _score_in_chunks(
        _score_chunk, student_hidden, [teacher_hidden.detach(), targets], (student_head, teacher_head, temperature, loss),
        mask, chunk_tokens,
    )


def score_tokens_top_k(
    student_hidden: Tensor,
    student_head: torch.nn.Module,
    teacher: TeacherTopK,
    targets: Tensor,
    mask: Tensor,
    temperature: float,
    loss: TopKLoss,
    chunk_tokens: int = 4096,
) -> TokenScores:
    """`score_tokens` for a teacher seen only through its sampled-token and top-k log-probs (a server).

    Args:
        student_hidden: (B, T, H_S) from `completion_hidden_states`, with grad when training.
        student_head: the student's output embedding.
        teacher: `TeacherTopK` with `sampled` (B, T), `ids` and `logprobs` (B, T, k), at the
            rollout's temperature, anything off the mask.
        targets: (B, T) int64 sampled token ids.
        mask: (B, T) bool, True on generated tokens.
        temperature: the rollout's sampling temperature (> 0), applied to the student.
        loss: a loss that reads no more than the teacher's top-k (`teacher_needs` not `vocabulary`).
        chunk_tokens: generated positions turned into student logits at once.
    Returns:
        `TokenScores`, each (B, T) float32.
    """
    per_token = [teacher.sampled, teacher.ids, teacher.logprobs, targets]
    return _score_in_chunks(_score_chunk_top_k, student_hidden, per_token, (student_head, temperature, loss), mask, chunk_tokens)


def _score_in_chunks(
    score_chunk, student_hidden: Tensor, per_token: list[Tensor], constants: tuple, mask: Tensor, chunk_tokens: int
) -> TokenScores:
    """`TokenScores` from `score_chunk` (four (C,) tensors: loss, student / teacher log-prob, entropy) over `in_chunks`."""
    token_loss, student_sampled, teacher_sampled, entropy = in_chunks(
        score_chunk, student_hidden, per_token, constants, mask, chunk_tokens, outputs=4
    )
    return TokenScores(student_sampled.detach(), teacher_sampled.detach(), entropy.detach(), token_loss)


def in_chunks(
    per_chunk, hidden: Tensor, per_token: list[Tensor], constants: tuple, mask: Tensor, chunk_tokens: int, outputs: int
) -> list[Tensor]:
    """The chunked loop: `per_chunk(hidden_C, *per_token_C, *constants)` over the masked positions, `chunk_tokens` at a time.

    Each chunk runs inside activation checkpointing when `hidden` needs a gradient, so neither
    the forward nor the backward holds more than one chunk's `(C, V)` logits.

    Args:
        per_chunk: returns `outputs` (C,) tensors.
        hidden: (B, T, H), gradients flow back through it.
        per_token: tensors (B, T, ...) cut at the same masked positions.
        constants: the remaining arguments, passed unchanged; the first is the output head,
            run by as many chunks (some maybe empty) on every process under FSDP.
        mask: (B, T) bool, True on completion tokens.
        chunk_tokens: positions per chunk.
    Returns:
        `outputs` (B, T) float32 tensors, 0 off the mask. The first stays attached to the graph
        even when nothing was generated, so backward still works.
    """
    mask = mask.bool()
    flat_hidden = hidden[mask]  # (N, H)
    flat_per_token = [values[mask] for values in per_token]  # each (N, ...)
    use_checkpoint = torch.is_grad_enabled() and flat_hidden.requires_grad
    pieces = []
    for chunk in lockstep_slices(flat_hidden.shape[0], chunk_tokens, constants[0]):
        args = (flat_hidden[chunk], *(values[chunk] for values in flat_per_token), *constants)
        pieces.append(checkpoint(per_chunk, *args, use_reentrant=False) if use_checkpoint else per_chunk(*args))
    if pieces:
        columns = [torch.cat(column) for column in zip(*pieces)]
    else:
        columns = [flat_hidden.new_zeros(0, dtype=torch.float32)] * outputs
    full = [values.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, values.float()) for values in columns]
    if not flat_hidden.shape[0]:  # nothing generated: keep the first output attached to the graph
        full[0] = full[0] + 0.0 * hidden.sum()
    return full


def _chunk_logprobs(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> tuple[Tensor]:
    """(C, H), (C,) -> ((C,),): float32 `log_softmax(head(hidden))` at each target token."""
    logprobs = torch.log_softmax(head(hidden).float(), dim=-1)  # (C, V)
    return (logprobs.gather(-1, targets[:, None]).squeeze(-1),)


def token_logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, mask: Tensor, chunk_tokens: int) -> Tensor:
    """Log-prob (temperature 1) of each completion token under one model, `chunk_tokens` positions at a time (`in_chunks`).

    Args:
        hidden: (B, T, H) from `completion_hidden_states`, with grad when training.
        head: the output embedding (`get_output_embeddings()`).
        targets: (B, T) int64 completion token ids.
        mask: (B, T) bool, True on completion tokens.
        chunk_tokens: positions turned into logits at once.
    Returns:
        (B, T) float32, 0 off the mask, carrying the gradient.
    """
    return in_chunks(_chunk_logprobs, hidden, [targets], (head,), mask, chunk_tokens, outputs=1)[0]

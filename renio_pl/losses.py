"""Token-level distillation objectives and the weighted batch reduction (one home each).

Stage 5 of the data flow (rollouts -> log-probs -> weights -> **loss**). A `Loss` maps one
chunk of `N` generated positions to `N` per-token values; `logprobs.score_tokens` calls it
chunk by chunk so that `[B, T, V]` logits never exist for the whole batch at once.
`weighted_loss` turns `(B, T)` token values into the batch loss: `mean_i w_i L_i`, with `L_i`
the mean over sample `i`'s generated tokens (reduction `sample`, the ReNIO release's), or the
weighted sum of every token value over the batch's generated tokens (reduction `token`, the
TRD release's). Each `Loss` names its reduction.

Shapes use the package glossary (`renio_pl/__init__.py`): `N` packed completion tokens (a loss sees any chunk of them), `V` vocabulary,
`k` top-k width, `B` rollouts, `T` completion tokens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from renio_pl.errors import ConfigError

__all__ = [
    "REDUCTIONS", "TEACHER_NEEDS", "Loss", "ForwardKL", "ReverseKL", "GeneralizedJSD", "TeacherTopK", "TopKLoss",
    "SampledReverseKL", "TopKForwardKL", "weighted_loss", "rollout_losses",
]

# Teacher log-probs are floored here before entering a loss: a teacher that gives a sampled
# token probability 0 (-inf) would otherwise make reverse KL infinite. exp(-1e4) is 0 in any dtype.
TEACHER_LOGPROB_FLOOR = -1.0e4


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(N, V) entries `p (log p - log q)` of KL(p || q); 0 where p == 0 (no 0 * inf NaN)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


REDUCTIONS = ("sample", "token")

# What a loss reads of the teacher at each position, least first: the log-prob of the sampled
# token only, that and the teacher's top-k tokens, or the whole vocabulary. A teacher behind a
# server gives the first two; the in-process teacher gives all three.
TEACHER_NEEDS = ("sampled", "top_k", "vocabulary")


class Loss(torch.nn.Module, ABC):
    """Per-token objective on one chunk of generated positions, and how its batch is reduced.

    Args:
        reduction: how `weighted_loss` turns the batch's token values into its loss:
            `sample` (default): `mean_i w_i L_i`, `L_i` the mean over sample `i`'s tokens, so
            every rollout counts alike whatever its length (the ReNIO release,
            `opsd_trainer.py` `compute_loss`); `token`: `sum_i w_i sum_t l_it / sum_i |M_i|`,
            every token alike, the count taken over every process's micro-batch of the same
            step (the TRD release, `recipe/opd/kl_trainer.py` `_compute_kl_loss`; see
            `weighted_loss`).
    """

    teacher_needs: ClassVar[str] = "vocabulary"  # one of TEACHER_NEEDS
    # True when the loss reads the completion tokens as the student's own draws from pi_S (a
    # policy gradient): it cannot train on tokens sampled by another model (TRD's rewrites)
    needs_own_samples: ClassVar[bool] = False
    own_samples_reason: ClassVar[str] = ""

    def __init__(self, reduction: str = "sample") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(f"model.loss.init_args.reduction must be sample or token; got {reduction!r}")
        self.reduction = reduction

    def forward(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        """Per-token loss.

        Args:
            student_logprobs: (N, V) float32 `log_softmax(student_logits / temperature)`, with grad.
            teacher_logprobs: (N, V) float32 teacher log-probs at the same positions, no grad.
            targets: (N,) int64 sampled token ids.
        Returns:
            (N,) float32 loss of each position.
        """
        return self.token_loss(student_logprobs, teacher_logprobs.clamp(min=TEACHER_LOGPROB_FLOOR), targets)

    @abstractmethod
    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        """(N, V), (N, V), (N,) -> (N,); teacher log-probs already floored."""


class ForwardKL(Loss):
    """Full-vocabulary `KL(pi_T || pi_S)` per position: what the ReNIO release trains with.

    Args:
        clamp: if set, each vocabulary entry `pi_T(v) (log pi_T(v) - log pi_S(v))` is clamped
            to `[0, clamp]` before the sum over `v` (the release uses 0.05; 0.06 for 8B).
        reduction: `sample` or `token` (see `Loss`).
    """

    def __init__(self, clamp: float | None = None, reduction: str = "sample") -> None:
        super().__init__(reduction)
        if clamp is not None and clamp <= 0:
            raise ConfigError(f"model.loss.init_args.clamp must be > 0 or null; got {clamp}")
        self.clamp = clamp

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        terms = _kl_terms(teacher_logprobs, student_logprobs)  # (N, V)
        if self.clamp is not None:
            terms = terms.clamp(0.0, self.clamp)
        return terms.sum(dim=-1)


class ReverseKL(Loss):
    """Full-vocabulary `KL(pi_S || pi_T)` per position (mode-seeking)."""

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        return _kl_terms(student_logprobs, teacher_logprobs).sum(dim=-1)


class GeneralizedJSD(Loss):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), per position.

    With `M = beta pi_T + (1 - beta) pi_S`:
    `JSD(beta) = beta KL(pi_T || M) + (1 - beta) KL(pi_S || M)`. Its value goes to 0 at both
    ends, so, as in GKD and TRL, the ends are defined as the two KLs they interpolate:
    `beta = 0` is forward `KL(pi_T || pi_S)` and `beta = 1` is reverse `KL(pi_S || pi_T)`.

    Args:
        beta: interpolation coefficient in [0, 1].
        reduction: `sample` or `token` (see `Loss`).
    """

    def __init__(self, beta: float = 0.5, reduction: str = "sample") -> None:
        super().__init__(reduction)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"model.loss.init_args.beta must be in [0, 1]; got {beta}")
        self.beta = beta

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        if self.beta == 0.0:
            return _kl_terms(teacher_logprobs, student_logprobs).sum(dim=-1)
        if self.beta == 1.0:
            return _kl_terms(student_logprobs, teacher_logprobs).sum(dim=-1)
        mixture = torch.logsumexp(
            torch.stack([teacher_logprobs + math.log(self.beta), student_logprobs + math.log(1.0 - self.beta)]),
            dim=0,
        )  # (N, V) log M
        teacher_term = _kl_terms(teacher_logprobs, mixture).sum(dim=-1)
        student_term = _kl_terms(student_logprobs, mixture).sum(dim=-1)
        return self.beta * teacher_term + (1.0 - self.beta) * student_term


@dataclass
class TeacherTopK:
    """What a teacher that cannot give the whole vocabulary (a server) gives at `N` positions.

    Attributes:
        sampled: (N,) float32 log pi_T of each sampled token.
        ids: (N, k) int64 the teacher's `k` most likely tokens at each position (`k` may be 0).
        logprobs: (N, k) float32 their log-probs under the full distribution (not renormalised).
    """

    sampled: Tensor
    ids: Tensor
    logprobs: Tensor

    @classmethod
    def from_logprobs(cls, teacher_logprobs: Tensor, targets: Tensor, k: int) -> "TeacherTopK":
        """From full-vocabulary log-probs (N, V) and sampled ids (N,): the sampled and top-`k` entries."""
        top = teacher_logprobs.topk(min(k, teacher_logprobs.shape[-1]), dim=-1)
        sampled = teacher_logprobs.gather(-1, targets[:, None]).squeeze(-1)
        return cls(sampled, top.indices, top.values)

    def floored(self) -> "TeacherTopK":
        """The same with every log-prob floored at `TEACHER_LOGPROB_FLOOR` (no -inf enters a loss)."""
        return TeacherTopK(
            self.sampled.clamp(min=TEACHER_LOGPROB_FLOOR), self.ids, self.logprobs.clamp(min=TEACHER_LOGPROB_FLOOR)
        )


class TopKLoss(Loss):
    """A loss that reads only the teacher's sampled-token log-prob and (`teacher_needs = "top_k"`) its top-k.

    It works from `TeacherTopK` (`forward_top_k`), so a teacher behind a server can feed it; with
    the full teacher in the process (`forward`) it takes the same view of it: the sampled entry
    and the exact top-`top_k`, so both paths give the same value for the same teacher.

    Args:
        top_k: teacher tokens per position the loss reads (0 when it reads the sampled token only).
        reduction: `sample` or `token` (see `Loss`).
    """

    teacher_needs: ClassVar[str] = "sampled"

    def __init__(self, top_k: int = 0, reduction: str = "sample") -> None:
        super().__init__(reduction)
        if top_k < 0 or (self.teacher_needs == "top_k" and top_k < 1):
            raise ConfigError(f"model.loss.init_args.top_k must be >= 1 for {type(self).__name__}; got {top_k}")
        self.top_k = top_k

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, targets: Tensor) -> Tensor:
        return self.top_k_loss(student_logprobs, TeacherTopK.from_logprobs(teacher_logprobs, targets, self.top_k), targets)

    def forward_top_k(self, student_logprobs: Tensor, teacher: TeacherTopK, targets: Tensor) -> Tensor:
        """Per-token loss from the teacher's sampled and top-k log-probs.

        Args:
            student_logprobs: (N, V) float32, with grad.
            teacher: `TeacherTopK` of the same N positions, at least `top_k` wide, no grad.
            targets: (N,) int64 sampled token ids.
        Returns:
            (N,) float32.
        """
        if teacher.ids.shape[-1] < self.top_k:
            raise ConfigError(
                f"{type(self).__name__} reads the teacher's top {self.top_k} tokens but the teacher gives "
                f"{teacher.ids.shape[-1]}; raise the teacher's top_k or lower model.loss.init_args.top_k"
            )
        floored = teacher.floored()
        top = TeacherTopK(floored.sampled, floored.ids[:, : self.top_k], floored.logprobs[:, : self.top_k])
        return self.top_k_loss(student_logprobs, top, targets)

    @abstractmethod
    def top_k_loss(self, student_logprobs: Tensor, teacher: TeacherTopK, targets: Tensor) -> Tensor:
        """(N, V), `TeacherTopK` of k = `top_k` (floored), (N,) -> (N,)."""


def _log1mexp(log_x: Tensor) -> Tensor:
    """`log(1 - exp(log_x))` for `log_x <= 0`, accurate at both ends (Maechler, 2012); -inf at 0."""
    log_x = log_x.clamp(max=0.0)
    return torch.where(log_x > -math.log(2.0), torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


class TopKForwardKL(TopKLoss):
    """Forward `KL(pi_T || pi_S)` over the teacher's top-k tokens at each position.

    `tail="renormalise"`: both distributions restricted to the teacher's top-k set `K` and
    renormalised there, `sum_{v in K} p(v) (log p(v) - log q(v))` with `p = pi_T / pi_T(K)`,
    `q = pi_S / pi_S(K)`. `tail="bucket"`: `k + 1` outcomes, the top-k tokens and the rest as
    one bucket of mass `1 - pi_T(K)` (teacher) and `1 - pi_S(K)` (student), no renormalisation.
    Both are KLs between proper distributions, so never negative (no clamp needed), and with
    `k = V` both equal the full-vocabulary `ForwardKL`. The bucket keeps the pressure on the
    student's mass outside `K`; renormalising drops it.

    Args:
        top_k: teacher tokens per position (the server teacher must give at least as many).
        tail: `renormalise` or `bucket`.
        reduction: `sample` or `token` (see `Loss`).
    """

    teacher_needs: ClassVar[str] = "top_k"
    TAILS = ("renormalise", "bucket")

    def __init__(self, top_k: int = 20, tail: str = "bucket", reduction: str = "sample") -> None:
        super().__init__(top_k, reduction)
        if tail not in self.TAILS:
            raise ConfigError(f"model.loss.init_args.tail must be renormalise or bucket; got {tail!r}")
        self.tail = tail

    def top_k_loss(self, student_logprobs: Tensor, teacher: TeacherTopK, targets: Tensor) -> Tensor:
        student_top = student_logprobs.gather(-1, teacher.ids)  # (N, k)
        if self.tail == "renormalise":
            teacher_top = teacher.logprobs - teacher.logprobs.logsumexp(dim=-1, keepdim=True)
            student_top = student_top - student_top.logsumexp(dim=-1, keepdim=True)
            return _kl_terms(teacher_top, student_top).sum(dim=-1)
        vocabulary = student_logprobs.shape[-1]
        if teacher.ids.shape[-1] >= vocabulary:  # nothing outside the top-k: no tail bucket
            return _kl_terms(teacher.logprobs, student_top).sum(dim=-1)
        teacher_tail = _log1mexp(teacher.logprobs.logsumexp(dim=-1))  # (N,)
        outside = student_logprobs.scatter(-1, teacher.ids, float("-inf"))  # (N, V), -inf on the top-k
        student_tail = outside.logsumexp(dim=-1)  # (N,) exact: no 1 - sum cancellation
        teacher_all = torch.cat([teacher.logprobs, teacher_tail[:, None]], dim=-1)  # (N, k + 1)
        student_all = torch.cat([student_top, student_tail[:, None]], dim=-1)
        return _kl_terms(teacher_all, student_all).sum(dim=-1)


class SampledReverseKL(TopKLoss):
    """Single-sample reverse KL (Lu et al., 2025): `stopgrad(l_t) * log pi_S(y_t)`.

    Its gradient is the policy-gradient estimate of `grad KL(pi_S || pi_T)` with the sampled
    token `y_t`; only the teacher's log-prob of that token enters (`teacher_needs = "sampled"`),
    so a server teacher can feed it.

    Args:
        reduction: `sample` or `token` (see `Loss`).
    """

    needs_own_samples = True
    own_samples_reason = "is a policy gradient over tokens the student sampled"

    def __init__(self, reduction: str = "sample") -> None:
        super().__init__(0, reduction)

    def top_k_loss(self, student_logprobs: Tensor, teacher: TeacherTopK, targets: Tensor) -> Tensor:
        student_sampled = student_logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        return (student_sampled - teacher.sampled).detach() * student_sampled


def rollout_losses(token_loss: Tensor, mask: Tensor) -> Tensor:
    """`L_i`, the mean of sample `i`'s token losses over its mask.

    Args:
        token_loss: (B, T) float per-token loss (0 or anything off the mask).
        mask: (B, T) bool, True on generated tokens.
    Returns:
        (B,) float, 0 for a row without tokens.
    """
    mask = mask.to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def weighted_loss(
    token_loss: Tensor, mask: Tensor, weights: Tensor, reduction: str = "sample",
    global_tokens: Tensor | float | None = None, processes: int = 1,
) -> Tensor:
    """The batch loss from per-token values and per-sample weights.

    `sample`: `mean_i w_i L_i`, `L_i` the mean of sample `i`'s token losses over its mask
    (`rollout_losses`).
    `token`: `P sum_i w_i sum_{t in M_i} l_it / N`, `N` = `global_tokens`, the generated tokens of
    this micro-batch and of the micro-batches the other `P - 1` processes train at the same step
    (default: this batch's own `sum_i |M_i|`, with `P` 1). Uniform weights on one process: the
    batch's summed token loss over its generated tokens. Lengths 1 and 4 with token losses [1] and
    [0, 0, 0, 0] in one batch: `sample` 0.5, `token` 0.2.

    Why `P`: DDP and FSDP average the gradients of the `P` processes, so with process `r`'s loss
    `P S_r / N` (`S_r` its weighted token sum) the gradient is that of `sum_r S_r / N`: the token
    mean over the union of the processes' micro-batches, as one process holding them all gets it.
    Gradient accumulation: Lightning divides each micro-batch's loss by
    `trainer.accumulate_grad_batches` `G`, so an optimizer step's gradient is that of
    `(1 / G) sum_a sum_r S_ra / N_a`, the mean over its `G` micro-steps of each one's token mean
    over all processes. That is the TRD release's loss exactly: each of its `forward_backward_batch`
    calls (one data-loader batch per process) divides the summed token KL by that call's response
    tokens summed over the data-parallel ranks, times the ranks (`recipe/opd/kl_trainer.py`,
    `_compute_kl_loss`: `kl_num / batch_num_tokens * dp_size`, with verl's FSDP engine's
    `forward_backward_batch` all-reducing `loss_mask.sum()` into `batch_num_tokens`), then by its
    `gradient_accumulation_steps`. On one process, lengths 1 and 4 with token losses [1] and
    [0, 0, 0, 0] in two micro-batches of one step give (1 / 1 + 0 / 4) / 2 = 0.5; on two
    processes, one rollout each at the same micro-step, (1 + 0) / 5 = 0.2.

    Args:
        token_loss: (B, T) float per-token loss (0 or anything off the mask).
        mask: (B, T) bool, True on generated tokens.
        weights: (B,) float32 detached weights.
        reduction: `sample` or `token`.
        global_tokens: () `N` for `token` (the same on every process), None for this batch's own.
        processes: `P`, the processes whose gradients are averaged (1 without data parallelism).
    Returns:
        () float32; a row without tokens contributes 0 (and nothing to the token count).
    """
    weights = weights.detach().to(token_loss.dtype)
    if reduction == "sample":
        return (weights * rollout_losses(token_loss, mask)).mean()
    if reduction == "token":
        mask = mask.to(token_loss.dtype)
        tokens = mask.sum() if global_tokens is None else torch.as_tensor(global_tokens, device=token_loss.device)
        summed = (weights * (token_loss * mask).sum(dim=1)).sum()
        return summed * processes / tokens.to(token_loss.dtype).clamp(min=1.0)
    raise ValueError(f"reduction must be sample or token; got {reduction!r}")


# --- Offline objectives on teacher traces (REDI, Xu et al. 2025) ---------------------------------
# The completions here are fixed teacher traces, not rollouts: each objective reads the student's
# log-prob of every trace token, `(B, T)` with 0 off the mask, and sums or averages it.

__all__ += ["length_normalized_logprobs", "TraceLoss", "SFTLoss", "REDILoss"]


def length_normalized_logprobs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """`log pi(y|x) / |y|` of each completion: summed token log-probs over its length (at least 1).

    Args:
        token_logprobs: (B, T) float log-prob of each completion token (EOS included), with grad.
        mask: (B, T) bool, True on completion tokens.
    Returns:
        (B,) float32.
    """
    mask = mask.to(torch.float32)
    return (token_logprobs.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TraceLoss(torch.nn.Module, ABC):
    """Objective on offline traces: positive completions (and, for pairwise objectives, negative ones).

    Attributes:
        needs_negatives: True when each positive comes with a negative of the same prompt
            (`TraceDataModule(stage="redi")`), False for positives alone (`stage="sft"`).
    """

    needs_negatives: bool

    @abstractmethod
    def forward(
        self,
        positive_logprobs: Tensor,
        positive_mask: Tensor,
        negative_logprobs: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        """Batch loss.

        Args:
            positive_logprobs: (B, T) float student log-prob of each positive completion token, with grad.
            positive_mask: (B, T) bool, True on completion tokens.
            negative_logprobs: (B, T') the same for the negative of each pair, or None.
            negative_mask: (B, T') bool, or None.
        Returns:
            () float32.
        """


class SFTLoss(TraceLoss):
    """Stage 1 of REDI: `-log pi(y_w | x)`, averaged over every completion token of the batch.

    The token mean over the batch (not a mean of per-completion means) is what the REDI
    authors' SFT trains with (TRL's `SFTTrainer`, loss on completion tokens only), so long
    traces weigh more than short ones.
    """

    needs_negatives = False

    def forward(
        self, positive_logprobs: Tensor, positive_mask: Tensor, negative_logprobs: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        mask = positive_mask.to(torch.float32)
        return -(positive_logprobs.float() * mask).sum() / mask.sum().clamp(min=1.0)


class REDILoss(TraceLoss):
    """Stage 2 of REDI, per pair: `-log pi(y_w|x) / |y_w| + alpha * log pi(y_l|x) / |y_l|`, batch mean.

    No reference model, sigmoid, margin or clipping. `alpha = 0` trains on the positives alone
    (with per-completion length normalisation); `alpha = 1` (symmetric) collapses unless the
    learning rate is tiny (the authors report it stable only near 2e-7).

    Args:
        alpha: weight of the negative term; the authors' 0.8 (swept 0.2 / 0.5 / 0.8 / 1.0).
    """

    needs_negatives = True

    def __init__(self, alpha: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"model.objective.init_args.alpha must be in [0, 1] (the authors use 0.8); got {alpha}")
        self.alpha = alpha

    def forward(
        self, positive_logprobs: Tensor, positive_mask: Tensor, negative_logprobs: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        if negative_logprobs is None or negative_mask is None:
            raise ValueError("REDILoss needs a negative completion for every positive one")
        if negative_logprobs.shape[0] != positive_logprobs.shape[0]:
            raise ValueError(
                f"REDILoss pairs positives and negatives: {positive_logprobs.shape[0]} positives, "
                f"{negative_logprobs.shape[0]} negatives"
            )
        positive = length_normalized_logprobs(positive_logprobs, positive_mask)  # (B,)
        negative = length_normalized_logprobs(negative_logprobs, negative_mask)  # (B,)
        return (-positive + self.alpha * negative).mean()

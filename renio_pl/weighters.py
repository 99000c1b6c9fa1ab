"""Per-rollout weights: how much each sampled completion counts in the batch loss.

Stage 4 of the data flow (rollouts -> log-probs -> **weights** -> loss). A `Weighter` maps
one batch of scored rollouts to a `[B]` tensor of weights that is detached, finite, >= 0 and
float32 on the inputs' device. Weights that are normalised average to 1 over the rows that
have at least one generated token; a row with no generated token gets weight 0.

Shapes use the package glossary (`renio_pl/__init__.py`): `B` rollouts in the batch, `T` completion tokens (padded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from renio_pl.errors import ConfigError

__all__ = [
    "Weighter",
    "WeighterInputs",
    "UniformWeighter",
    "OracleWeighter",
    "LengthWeighter",
    "EntropyWeighter",
    "ReNIOWeighter",
]


@dataclass
class WeighterInputs:
    """One batch of scored rollouts.

    Attributes:
        student_logprobs: (B, T) log pi_S of each sampled token (temperature-scaled).
        teacher_logprobs: (B, T) log pi_T of the same tokens.
        mask: (B, T) bool, True on generated (trained) tokens.
        student_entropy: (B, T) student next-token entropy, or None.
        correct: (B,) 1.0 correct / 0.0 incorrect from a verifier, or None.
    """

    student_logprobs: Tensor
    teacher_logprobs: Tensor
    mask: Tensor
    student_entropy: Tensor | None = None
    correct: Tensor | None = None

    @property
    def has_tokens(self) -> Tensor:
        """(B,) bool: rows with at least one generated token."""
        return self.mask.bool().any(dim=1)

    def log_ratio(self) -> Tensor:
        """(B, T) float32 `l_t = log pi_S - log pi_T`, detached; 0 off the mask, never NaN.

        A teacher log-prob of -inf gives `+inf` (kept: ReNIO clips it); NaN (both -inf) gives 0.
        """
        ratio = self.student_logprobs.detach().float() - self.teacher_logprobs.detach().float()
        ratio = torch.nan_to_num(ratio, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        return torch.where(self.mask.bool(), ratio, torch.zeros_like(ratio))


def _mean_one(scores: Tensor, valid: Tensor) -> Tensor:
    """Scale non-negative `scores` (B,) so they average 1 over `valid` rows; 0 elsewhere.

    All-zero scores (nothing kept) give all-zero weights: no gradient from the batch.
    """
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    total = scores.sum()
    if total <= 0:
        return torch.zeros_like(scores)
    return scores * (valid.sum() / total)


class Weighter(torch.nn.Module, ABC):
    """Base class: `forward(inputs) -> (B,)` weights, detached, finite, >= 0, float32.

    `needs_own_samples`: True when the weights read the completion tokens as the student's own
    choices (they mean nothing on tokens another model sampled, e.g. TRD's rewrites).
    """

    needs_own_samples: ClassVar[bool] = False
    own_samples_reason: ClassVar[str] = ""

    def forward(self, inputs: WeighterInputs) -> Tensor:
        with torch.no_grad():
            return self.compute(inputs).detach().float()

    @abstractmethod
    def compute(self, inputs: WeighterInputs) -> Tensor:
        """(B,) weights for `inputs`, before the base class detaches them."""

    def statistics(self, inputs: WeighterInputs, weights: Tensor) -> dict[str, Tensor]:
        """Scalars to log for one batch: mean and max weight over rows with tokens."""
        valid = inputs.has_tokens
        kept = weights[valid] if valid.any() else weights.new_zeros(1)
        return {"mean": kept.mean(), "max": kept.max()}


class UniformWeighter(Weighter):
    """`w_i = 1` for every rollout with tokens: standard OPD / OPSD."""

    def compute(self, inputs: WeighterInputs) -> Tensor:
        return inputs.has_tokens.float()


class OracleWeighter(Weighter):
    """Weights from verifier labels (needs full, graded rollouts).

    Args:
        mode: `incorrect_only` keeps incorrect rollouts (the paper's winning filter),
            `correct_only` keeps correct ones, `mix` gives incorrect rollouts `alpha` and
            correct ones `1 - alpha`. Weights are then scaled to mean 1 over the batch; a batch
            that keeps nothing gets all-zero weights (no gradient).
        alpha: share given to incorrect rollouts in `mix` mode, in [0, 1].
    """

    def __init__(
        self, mode: Literal["incorrect_only", "correct_only", "mix"] = "incorrect_only", alpha: float = 0.5
    ) -> None:
        super().__init__()
        if mode not in ("incorrect_only", "correct_only", "mix"):
            raise ConfigError(f"OracleWeighter mode must be incorrect_only, correct_only or mix; got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"OracleWeighter alpha must be in [0, 1]; got {alpha}")
        self.mode = mode
        self.alpha = alpha

    def compute(self, inputs: WeighterInputs) -> Tensor:
        if inputs.correct is None:
            raise ConfigError(
                "OracleWeighter needs correctness labels, but the rollouts have none: give the training "
                "data an answer column (data.answer_field) so the verifier (data.verifier) grades each rollout"
            )
        correct = inputs.correct.float().to(inputs.mask.device)
        incorrect = 1.0 - correct
        if self.mode == "incorrect_only":
            scores = incorrect
        elif self.mode == "correct_only":
            scores = correct
        else:
            scores = self.alpha * incorrect + (1.0 - self.alpha) * correct
        return _mean_one(scores, inputs.has_tokens)


class LengthWeighter(Weighter):
    """`w_i ~ |M_i| ** power`, scaled to mean 1 (longer outputs are more often wrong).

    Args:
        power: exponent `p` on the number of generated tokens.
    """

    def __init__(self, power: float = 1.0) -> None:
        super().__init__()
        self.power = power

    def compute(self, inputs: WeighterInputs) -> Tensor:
        lengths = inputs.mask.float().sum(dim=1)
        return _mean_one(lengths.clamp(min=1.0).pow(self.power), inputs.has_tokens)


class EntropyWeighter(Weighter):
    """`w_i ~` mean student next-token entropy over the generated tokens, scaled to mean 1.

    A batch whose entropies are all zero gets uniform weights.
    """

    def compute(self, inputs: WeighterInputs) -> Tensor:
        if inputs.student_entropy is None:
            raise ValueError("EntropyWeighter needs WeighterInputs.student_entropy (B, T); got None")
        mask = inputs.mask.float()
        entropy = torch.nan_to_num(inputs.student_entropy.detach().float(), nan=0.0, posinf=0.0).clamp(min=0.0)
        mean_entropy = (entropy * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        valid = inputs.has_tokens
        weights = _mean_one(mean_entropy, valid)
        return weights if weights.any() else valid.float()


class ReNIOWeighter(Weighter):
    """ReNIO: up-weight rollouts whose student-to-teacher log-ratio spikes at pivotal tokens.

    Three phases, as the authors released them: (I) `l_t = log pi_S - log pi_T` on every
    sampled token; (II) pivotal tokens `P_i = {t in M_i : l_t >= threshold}`; (III) score
    `s_i = mean_{t in P_i} min(l_t, clip)` (0 when `P_i` is empty), raw weight
    `u_i = exp(s_i / temperature)`, then normalisation. With `clip_before_threshold` the
    release's order: `P_i = {t in M_i : min(l_t, clip) >= threshold}` (`opsd_trainer.py`
    `_compute_weights_ratio38`); the two differ only when `threshold > clip`, where the
    release's order finds no pivotal token at all (every weight 1 before normalisation).

    Args:
        threshold: `tau`, the log-ratio at or above which a token is pivotal.
        clip: upper clip on each pivotal `l_t` before averaging (> 0).
        temperature: divides the score before `exp` (> 0).
        normalization: `batch_mean`: `w = min(u / mean(u), cap)`; `none`: `w = u`;
            `ema`: `w = min(u / m, cap)` with `m` a running mean of batch means (updated in
            training mode, `m <- (1 - ema_alpha) m + ema_alpha * mean(u)`, first batch sets it);
            `clamp`: `u` clipped to [0.1, 10], then divided by its mean.
        cap: upper bound on a normalised weight (`batch_mean`, `ema`), >= 1; None: uncapped
            (the release caps `batch_mean` at 10 and leaves `ema` uncapped).
        scope: `micro_batch` normalises over this process's batch (as released); `global`
            over the batch of all processes (sums all-reduced).
        ema_alpha: update rate of the `ema` running mean, in (0, 1].
        clip_before_threshold: True: `l_t` is clipped to `clip` before the threshold test
            (the release's order); False: the threshold tests the unclipped `l_t`.
    """

    needs_own_samples = True
    own_samples_reason = "reads the student's choices of its own sampled tokens"

    def __init__(
        self,
        threshold: float = 0.8,
        clip: float = 2.5,
        temperature: float = 1.0,
        normalization: Literal["batch_mean", "none", "ema", "clamp"] = "batch_mean",
        cap: float | None = 10.0,
        scope: Literal["micro_batch", "global"] = "micro_batch",
        ema_alpha: float = 0.1,
        clip_before_threshold: bool = False,
    ) -> None:
        super().__init__()
        prefix = "model.weighter.init_args"
        if normalization not in ("batch_mean", "none", "ema", "clamp"):
            raise ConfigError(
                f"{prefix}.normalization must be one of batch_mean, none, ema, clamp; got {normalization!r}"
            )
        if scope not in ("micro_batch", "global"):
            raise ConfigError(f"{prefix}.scope must be micro_batch or global; got {scope!r}")
        if clip <= 0:
            raise ConfigError(f"{prefix}.clip must be > 0; got {clip}")
        if temperature <= 0:
            raise ConfigError(f"{prefix}.temperature must be > 0; got {temperature}")
        if cap is not None and cap < 1:
            raise ConfigError(f"{prefix}.cap must be >= 1 (weights average 1); got {cap}")
        if not 0 < ema_alpha <= 1:
            raise ConfigError(f"{prefix}.ema_alpha must be in (0, 1]; got {ema_alpha}")
        self.threshold = threshold
        self.clip = clip
        self.temperature = temperature
        self.normalization = normalization
        self.cap = cap
        self.scope = scope
        self.ema_alpha = ema_alpha
        self.clip_before_threshold = clip_before_threshold
        # Running mean for `ema`; NaN until the first batch. In the state dict, so it resumes.
        self.register_buffer("ema_mean", torch.tensor(float("nan")))

    def pivotal(self, inputs: WeighterInputs) -> Tensor:
        """(B, T) bool: generated tokens whose log-ratio (clipped first, in the release's order) is >= the threshold."""
        ratio = inputs.log_ratio()
        if self.clip_before_threshold:
            ratio = ratio.clamp(max=self.clip)
        return inputs.mask.bool() & (ratio >= self.threshold)

    def raw_weights(self, inputs: WeighterInputs) -> Tensor:
        """(B,) float32 `u_i = exp(s_i / temperature)`, before normalisation."""
        pivotal = self.pivotal(inputs)
        clipped = torch.where(pivotal, inputs.log_ratio().clamp(max=self.clip), 0.0)
        count = pivotal.sum(dim=1)
        score = clipped.sum(dim=1) / count.clamp(min=1)  # 0 when no pivotal token
        return torch.exp(score / self.temperature)

    def compute(self, inputs: WeighterInputs) -> Tensor:
        valid = inputs.has_tokens
        raw = torch.where(valid, self.raw_weights(inputs), 0.0)
        if self.normalization == "none":
            return raw
        if self.normalization == "clamp":
            clamped = torch.where(valid, raw.clamp(0.1, 10.0), 0.0)
            return clamped / self._mean(clamped, valid)
        batch_mean = self._mean(raw, valid)
        if self.normalization == "ema":
            if self.training:
                new = batch_mean if torch.isnan(self.ema_mean) else (
                    (1 - self.ema_alpha) * self.ema_mean + self.ema_alpha * batch_mean
                )
                self.ema_mean.copy_(new)
            denominator = batch_mean if torch.isnan(self.ema_mean) else self.ema_mean
        else:
            denominator = batch_mean
        normalised = raw / denominator
        return normalised if self.cap is None else normalised.clamp(max=self.cap)

    def _mean(self, values: Tensor, valid: Tensor) -> Tensor:
        """Mean of `values` over valid rows of this batch, or of all ranks' batches (`global`)."""
        total = torch.stack([values.sum(), valid.sum().float()])
        if self.scope == "global" and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        if total[1] == 0:
            return total.new_ones(())  # no row has tokens: every weight is 0 anyway
        return (total[0] / total[1]).clamp(min=torch.finfo(torch.float32).tiny)

    def statistics(self, inputs: WeighterInputs, weights: Tensor) -> dict[str, Tensor]:
        """Adds `pivotal_share`: pivotal tokens over generated tokens."""
        stats = super().statistics(inputs, weights)
        stats["pivotal_share"] = self.pivotal(inputs).sum() / inputs.mask.sum().clamp(min=1)
        return stats

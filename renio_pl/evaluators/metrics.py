"""Accuracy over k samples per problem as torchmetrics: Avg@k, unbiased pass@k, majority vote.

Each metric keeps one record per graded sample, (problem, sample, correct, answer key), in
float64 `cat` states (float64 holds the 52-bit answer keys exactly; `compute_accuracy` sets
that dtype again before gathering, since a process that graded nothing sends empty records in
the metric's dtype, which moving it to a device resets), so torchmetrics gathers every process's records before `compute`. Computing
from whole records, not from per-process sums, is what makes the number independent of how
problems were split among processes; a (problem, sample) pair seen twice or a problem with
fewer samples than the others is an error, never silently averaged in.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["answer_key", "NothingGraded", "SampleRecords", "AvgAtK", "PassAtK", "MajorityVote", "NO_ANSWER"]

_RECORDS = ("problem", "sample", "correct", "answer")  # the states, one entry per graded sample
NO_ANSWER = 0  # the answer key of a sample whose final answer could not be extracted


def answer_key(final_answer: str | None) -> int:
    """A stable 52-bit key of an extracted final answer (whitespace-insensitive); `NO_ANSWER` for None."""
    if final_answer is None or not final_answer.strip():
        return NO_ANSWER
    digest = hashlib.sha256("".join(final_answer.split()).encode()).digest()
    return int.from_bytes(digest[:7], "big") >> 4 or 1


class NothingGraded(ValueError):
    """`compute` found no records on any process."""


class SampleRecords(Metric):
    """Records of graded samples; subclasses reduce the (problems, k) table in `compute`."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in _RECORDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, problem: Tensor, sample: Tensor, correct: Tensor, answer: Tensor | None = None) -> None:
        """Add graded samples.

        Args:
            problem: (B,) int, the problem's index in its benchmark.
            sample: (B,) int, the sample's index among its problem's k samples.
            correct: (B,) bool or 0/1, the verifier's verdict.
            answer: (B,) `answer_key` of each final answer (majority vote needs it).
        """
        self.problem.append(problem.double())
        self.sample.append(sample.double())
        self.correct.append(correct.double())
        self.answer.append(torch.full_like(problem, NO_ANSWER, dtype=torch.float64) if answer is None else answer.double())

    def table(self) -> tuple[Tensor, Tensor]:
        """All records, one row per problem (sorted by index), one column per sample.

        Returns:
            correct: (problems, k) float64 0/1.
            answer: (problems, k) int64 answer keys.
        """
        states = [self.problem, self.sample, self.correct, self.answer]
        if any(isinstance(state, list) and not state for state in states) or dim_zero_cat(self.problem).numel() == 0:
            raise NothingGraded(f"{type(self).__name__}: no samples were graded")
        problem, sample, correct, answer = (dim_zero_cat(state) for state in states)
        problem, sample, answer = problem.long(), sample.long(), answer.long()
        pairs = torch.stack([problem, sample], dim=1)
        unique_pairs, counts = pairs.unique(dim=0, return_counts=True)
        if (counts > 1).any():
            twice = unique_pairs[counts > 1][0].tolist()
            raise ValueError(f"problem {twice[0]} sample {twice[1]} was graded more than once")
        problems, per_problem = problem.unique(return_counts=True)
        if (per_problem != per_problem[0]).any():
            short = problems[per_problem != per_problem.max()][0]
            raise ValueError(
                f"problem {int(short)} has {int(per_problem[problems == short])} samples, others "
                f"{int(per_problem.max())}: every problem needs the same number of samples"
            )
        k = int(per_problem[0])
        order = torch.argsort(problem * (int(sample.max()) + 1) + sample)
        return correct[order].view(-1, k), answer[order].view(-1, k)


class AvgAtK(SampleRecords):
    """Avg@k: accuracy averaged over the k samples of each problem, then over problems."""

    def compute(self) -> Tensor:
        correct, _ = self.table()
        return correct.mean()


class PassAtK(SampleRecords):
    """pass@k with the unbiased estimator of Chen et al. (2021): `1 - C(n - c, k) / C(n, k)` per problem.

    Args:
        k: samples drawn per try; at most the samples per problem `n`.
    """

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1; got {k}")
        self.k = k

    def compute(self) -> Tensor:
        correct, _ = self.table()
        n = correct.shape[1]
        if self.k > n:
            raise ValueError(f"pass@{self.k} needs at least {self.k} samples per problem; got {n}")
        wrong = n - correct.sum(dim=1)  # (problems,)
        # C(w, k) / C(n, k) = prod_{i=0}^{k-1} (w - i) / (n - i), which is 0 once i reaches w.
        steps = torch.arange(self.k, device=correct.device, dtype=correct.dtype)  # 0, 1, ..., k - 1 (pass@k's k)
        all_wrong = ((wrong[:, None] - steps).clamp(min=0) / (n - steps)).prod(dim=1)
        return (1.0 - all_wrong).mean()


class MajorityVote(SampleRecords):
    """maj@k: a problem counts as solved when its most frequent final answer is correct.

    Samples without an extracted answer do not vote; a tie goes to the answer that appeared
    first (lowest sample index); a problem with no votes counts as wrong.
    """

    def compute(self) -> Tensor:
        correct, answer = self.table()
        solved = []
        for row_correct, row_answer in zip(correct, answer):
            voted = row_answer != NO_ANSWER
            if not voted.any():
                solved.append(0.0)
                continue
            first, counts = _first_seen_counts(row_answer[voted])
            winner = first[counts == counts.max()].min()  # position among the voters
            solved.append(float(row_correct[voted][winner]))
        return torch.tensor(solved, device=correct.device).mean()


def _first_seen_counts(keys: Tensor) -> tuple[Tensor, Tensor]:
    """For each distinct key: the position where it first appears, and how often it appears."""
    distinct, inverse, counts = keys.unique(return_inverse=True, return_counts=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full_like(distinct, keys.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return first, counts

"""Verifiers that grade a whole batch of completions at once.

The data module grades math completions one at a time with `data.verifier`
(`(completion, answer) -> bool`). A benchmark whose grading is costly per call, such as
running programs in a sandbox, sets `EvalSet.verifier` to a `BatchVerifier` instead: it gets
every completion of a sampling call with its reference and returns one `Verdict` each, so it
can run them in parallel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Verdict", "BatchVerifier"]


@dataclass(frozen=True)
class Verdict:
    """One completion's grade.

    Attributes:
        correct: whether the completion counts as solved (what Avg@k and pass@k count).
        final_answer: what majority voting compares; None when the completion has none.
        detail: a finer verdict kept in the report (code: `pass`, `base:fail`, `plus:timeout`, ...).
    """

    correct: bool
    final_answer: str | None = None
    detail: str | None = None


class BatchVerifier(ABC):
    """Grades a batch of completions against their references.

    `majority_vote` says whether maj@k means anything for its verdicts (it needs final answers
    that can be compared); when False, maj@k is not reported.
    """

    majority_vote: bool = True

    @abstractmethod
    def grade(self, completions: list[str], references: list[str]) -> list[Verdict]:
        """One verdict per completion, in order; `references[i]` is the data's answer column for completion i."""

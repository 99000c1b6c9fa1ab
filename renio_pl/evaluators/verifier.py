"""The one grading protocol: a `BatchVerifier` grades a batch of completions against their references.

Every completion the data module samples (training rounds, validation, `renio-pl test` and
`predict`) is graded through this interface, a sampling call at a time:
`renio_pl.evaluators.math.MathVerifier` checks final answers (the data module's default,
built from `data.verifier` and `data.answer_extractor`), and
`renio_pl.evaluators.code.CodeVerifier` runs programs in a sandbox (a test set's own
`verifier`). Grading a batch at once lets a costly grader run its checks in parallel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Verdict", "BatchVerifier"]


@dataclass(frozen=True)
class Verdict:
    """One completion's grade.

    Attributes:
        correct: whether the completion counts as solved (what Avg@k and pass@k count); None
            when its row has no reference answer (nothing to grade against).
        final_answer: what majority voting compares; None when the completion has none.
        detail: a finer verdict kept in the report (code: `pass`, `base:fail`, `plus:timeout`, ...).
    """

    correct: bool | None
    final_answer: str | None = None
    detail: str | None = None


class BatchVerifier(ABC):
    """Grades a batch of completions against their references.

    `majority_vote` says whether maj@k means anything for its verdicts (it needs final answers
    that can be compared); when False, maj@k is not reported.
    """

    majority_vote: bool = True

    @abstractmethod
    def grade(self, completions: list[str], references: list[str | None]) -> list[Verdict]:
        """One verdict per completion, in order.

        `references[i]` is the data's answer column for completion i, None when the row has no
        answer: that completion's verdict has `correct` None (and may still give a final answer,
        for predictions).
        """

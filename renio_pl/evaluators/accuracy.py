"""Graded rollouts -> accuracy metrics: the evaluation end of the data flow.

`accuracy_metrics` builds the set reported for a benchmark (Avg@k, maj@k, pass@k) as one
`MetricCollection` (its members share one copy of the records); `update_accuracy` feeds it
a batch of graded `Rollout`s; `compute_accuracy` gathers over processes and reduces.
Validation during `fit` and `renio-pl test` use the same three functions.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection

from renio_pl.evaluators.metrics import AvgAtK, MajorityVote, PassAtK, SampleRecords, answer_key
from renio_pl.rollouts import Rollout

__all__ = ["accuracy_metrics", "update_accuracy", "compute_accuracy", "completion_record"]


def accuracy_metrics(n: int, pass_at_k: list[int], majority: bool = True) -> MetricCollection:
    """Avg@n, and with several samples per problem maj@n (unless `majority` is False) and each pass@k with 1 < k <= n."""
    metrics = {f"avg@{n}": AvgAtK()}
    if n > 1:
        if majority:
            metrics[f"maj@{n}"] = MajorityVote()
        metrics.update({f"pass@{k}": PassAtK(k) for k in sorted(set(pass_at_k)) if 1 < k <= n})
    return MetricCollection(metrics, compute_groups=[list(metrics)])


def update_accuracy(metrics: MetricCollection, rollouts: list[Rollout], device: torch.device) -> None:
    """Add the graded rollouts of a batch (those without a verdict are left out)."""
    graded = [r for r in rollouts if r.correct is not None]
    if not graded:
        return
    columns = [
        [r.prompt_index for r in graded],
        [r.sample_index for r in graded],
        [float(r.correct) for r in graded],
        [answer_key(r.final_answer) for r in graded],
    ]
    metrics.update(*(torch.tensor(column, dtype=torch.float64, device=device) for column in columns))


def compute_accuracy(metrics: MetricCollection) -> dict[str, float]:
    """Every metric over all processes' records (empty when nothing was graded anywhere); then reset.

    Every process must call it (a collective when torch.distributed is initialized). The count
    of records is agreed on first: `compute` on records that are empty everywhere would raise
    between torchmetrics' sync and unsync, leaving the states synced and the metrics unusable.
    """
    metrics.set_dtype(torch.float64)  # empty records go out as float64 like the others' (`.to(device)` resets the dtype)
    results = {name: float(value) for name, value in metrics.compute().items()} if _graded_anywhere(metrics) else {}
    metrics.reset()
    return results


def _graded_anywhere(metrics: MetricCollection) -> bool:
    """Whether any process holds a graded record (the members of the collection share one copy)."""
    records: SampleRecords = next(iter(metrics.values()))
    count = torch.tensor([float(sum(len(part) for part in records.problem))], device=records.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return bool(count.item() > 0)


def completion_record(rollout: Rollout) -> dict:
    """What a report keeps of one sample: indices, the completion, its answer and verdict (and a batch verifier's detail)."""
    return {
        "problem": rollout.prompt_index,
        "sample": rollout.sample_index,
        "completion": rollout.text,
        "completion_tokens": len(rollout.completion_ids),
        "final_answer": rollout.final_answer,
        "answer": rollout.answer,
        "correct": rollout.correct,
        **({"verdict": rollout.verdict} if rollout.verdict is not None else {}),
    }

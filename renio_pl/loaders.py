"""How rollouts are dealt into batches and served: the loaders both data modules build on.

- `balance_shares` / `batch_sizes`: every process's share of a round evened out, then cut
  into the same number of batches on every process;
- `ResumableLoader`: a training loader that resumes mid-epoch (the on-policy rounds' and the
  offline traces');
- `OwnShare`: the sampler that keeps Lightning from splitting a share that is already this
  process's own;
- `SampledOnIteration`: held-out and benchmark rollouts, sampled each time they are iterated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from renio_pl.rollouts import Rollout, RolloutBatch

__all__ = ["OwnShare", "ResumableLoader", "SampledOnIteration", "balance_shares", "batch_sizes", "trained_batches"]


def balance_shares(shares: list[list[Rollout]], batch_size: int) -> tuple[list[list[Rollout]], int]:
    """Every rank's rollouts of a round, dealt again so that all ranks train the same number of batches.

    Shares are evened to sizes that differ by at most one (rank `r` keeps `q + 1` when `r` is under
    the remainder of `R / world`, else `q`): a rank over its size hands its last rollouts on, in rank
    order, to the ranks under theirs. Every rank then trains `ceil((q + 1) / batch_size)` batches
    (`batch_sizes`), a `q`-rollout share in smaller ones. Only when a `q`-rollout share cannot fill
    that many batches (`batch_size` 1, or fewer rollouts than ranks) is the remainder left out: the
    last rollout of each `q + 1` share.

    Args:
        shares: per rank, its rollouts of the round (the same lists on every rank).
        batch_size: the most rollouts in a batch (`data.batch_size`).
    Returns:
        The new shares (rank-ordered), and how many rollouts were left out.
    """
    world, total = len(shares), sum(map(len, shares))
    base, remainder = divmod(total, world)
    sizes = [base + (rank < remainder) for rank in range(world)]
    spare = [r for share, size in zip(shares, sizes) for r in share[size:]]
    balanced = []
    for share, size in zip(shares, sizes):
        kept = share[:size]
        taken, spare = spare[: size - len(kept)], spare[size - len(kept):]
        balanced.append(kept + taken)
    dropped = 0
    if remainder and base < math.ceil((base + 1) / batch_size):
        balanced = [share[:base] for share in balanced]
        dropped = remainder
    return balanced, dropped


def batch_sizes(rollouts: int, batches: int, batch_size: int) -> list[int]:
    """Sizes of `batches` non-empty batches of `rollouts`: full batches of `batch_size` first.

    `batches` is `ceil(longest share / batch_size)` (`balance_shares`), so a share as long as the
    longest is batched as usual, and a shorter one ends in smaller batches: in 3 batches of at most
    2, 5 rollouts give [2, 2, 1] and 4 give [2, 1, 1].
    """
    if not batches <= rollouts <= batches * batch_size:
        raise ValueError(f"{rollouts} rollouts do not fill {batches} batches of 1 to {batch_size}")
    sizes, left = [], rollouts
    for i in range(batches):
        size = min(batch_size, left - (batches - i - 1))
        sizes.append(size)
        left -= size
    return sizes


def trained_batches(trainer: Any) -> int:
    """Training batches of the current epoch done so far (read from the fit loop's progress)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class OwnShare(DistributedSampler):
    """This rank's batches, in order.

    A `DistributedSampler` of one replica in name only: Lightning splits a training loader's data
    between the processes unless its sampler is distributed, and the on-policy `train_dataloader`
    already took this rank's share of the round; split again, each rank would train on half of its
    batches.
    """

    def __init__(self, batches: list[list[Rollout]]) -> None:
        super().__init__(batches, num_replicas=1, rank=0, shuffle=False)


class ResumableLoader(DataLoader):
    """A training loader resumable mid-epoch (Lightning saves and restores its state): the on-policy
    round's, and the offline traces' (`renio_pl.offline.TraceDataModule`).

    Its state is the number of batches already trained this epoch, taken from the fit loop
    rather than counted here (Lightning fetches a batch ahead). After `load_state_dict` the
    next pass skips those batches; `len` stays the whole epoch, as Lightning's counters expect.

    Args:
        batches_done: returns the number of batches the fit loop has trained this epoch
            (`trained_batches`).
        *args, **kwargs: `torch.utils.data.DataLoader`'s.
    """

    def __init__(self, batches_done: Callable[[], int], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done, self.skip = batches_done, 0

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["batches_done"]

    def __iter__(self) -> Iterator[RolloutBatch]:
        # A generator: Lightning creates iterators it never draws from, so the skip (and the
        # sampler's shuffle) are taken by the first batch actually drawn, not by `iter()`.
        skip, self.skip = self.skip, 0
        yield from islice(super().__iter__(), skip, None)


class SampledOnIteration(IterableDataset):
    """Lists of rollouts, sampled anew each time the data set is iterated."""

    def __init__(self, sample: Callable[[], list[Rollout]], batch_size: int) -> None:
        self.sample, self.batch_size = sample, batch_size

    def __iter__(self) -> Iterator[list[Rollout]]:
        rollouts = self.sample()
        for start in range(0, len(rollouts), self.batch_size):
            yield rollouts[start : start + self.batch_size]

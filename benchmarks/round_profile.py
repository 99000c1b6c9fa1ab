"""Time share of each stage of one on-policy training round on the demo models (CPU).

Stages: rollout (engine sampling + decoding + grading), scoring (student and teacher forward,
chunked log-probs), weighting (the Weighter), loss (per-token objective + weighted reduction,
forward), update (backward + optimizer step). The loss runs inside the chunked scoring pass;
its time is measured by a timing wrapper around the `Loss` and taken out of scoring.

    python benchmarks/round_profile.py [--rounds 3] [--weighter ReNIOWeighter]
"""

from __future__ import annotations

import argparse
import time

import torch

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import build_assets
from renio_pl.losses import ForwardKL, Loss, weighted_loss
from renio_pl.module import DistillationModule
from renio_pl.rollouts import SamplingConfig, collate_rollouts
from renio_pl import weighters
from renio_pl.weighters import WeighterInputs


class TimedLoss(Loss):
    """Wraps a Loss and adds up the seconds spent in its forward."""

    def __init__(self, inner: Loss) -> None:
        super().__init__()
        self.inner, self.seconds = inner, 0.0

    def forward(self, *args):
        start = time.perf_counter()
        out = self.inner(*args)
        self.seconds += time.perf_counter() - start
        return out

    def token_loss(self, *args):
        return self.inner.token_loss(*args)


class _Trainer:  # the two attributes the data module reads outside a Lightning run
    def __init__(self, module):
        self.lightning_module, self.current_epoch, self.global_rank, self.world_size = module, 0, 0, 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weighter", default="ReNIOWeighter")
    args = parser.parse_args()
    assets = build_assets("demo_assets")
    timed = TimedLoss(ForwardKL())
    module = DistillationModule(str(assets / "student"), str(assets / "teacher"), getattr(weighters, args.weighter)(), timed)
    data = OnPolicyDataModule(
        str(assets / "train.jsonl"), tokenizer=str(assets / "student"),
        sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=6), prompts_per_epoch=128, batch_size=64,
    )
    data.trainer = _Trainer(module)
    data.setup("fit")
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=3e-4)
    totals = dict.fromkeys(["rollout", "scoring", "weighting", "loss", "update"], 0.0)
    for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
        seconds = dict.fromkeys(totals, 0.0)
        start = time.perf_counter()
        rollouts = data.sample_round(round_index)
        seconds["rollout"] = time.perf_counter() - start
        for first in range(0, len(rollouts), data.batch_size):
            batch = collate_rollouts(rollouts[first : first + data.batch_size], data.tokenizer.pad_token_id)
            timed.seconds = 0.0
            start = time.perf_counter()
            scores = module.score(batch)
            seconds["scoring"] += time.perf_counter() - start - timed.seconds
            seconds["loss"] += timed.seconds
            start = time.perf_counter()
            inputs = WeighterInputs(scores.student_logprobs, scores.teacher_logprobs, batch.completion_mask, scores.student_entropy, batch.correct)
            weights = module.weighter(inputs)
            seconds["weighting"] += time.perf_counter() - start
            start = time.perf_counter()
            loss = weighted_loss(scores.token_loss, batch.completion_mask, weights)
            seconds["loss"] += time.perf_counter() - start
            start = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds["update"] += time.perf_counter() - start
        if round_index > 0:
            totals = {k: totals[k] + seconds[k] for k in totals}
    whole = sum(totals.values())
    print(f"{args.rounds} rounds of {len(rollouts)} rollouts ({args.weighter} + ForwardKL, torch threads {torch.get_num_threads()}):")
    for stage, value in totals.items():
        print(f"  {stage:<10} {value / args.rounds * 1000:8.1f} ms/round  {100 * value / whole:5.1f}%")
    print(f"  weighter + loss: {100 * (totals['weighting'] + totals['loss']) / whole:.2f}% of a round (goal < 2%)")


if __name__ == "__main__":
    main()

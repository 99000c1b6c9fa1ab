"""configs/paper/: every release value, and a rehearsal of each file on tiny local models.

The values are checked against the ReNIO release (github BDML-lab/ReNIO at 3bb2474; "sh" is the
script each config reproduces), typed here from its files, line by line. The rehearsal loads the
same file with only the model ids, data, lengths, engine and accelerator swapped (CPU, one process:
its per-process share of a rollout round, as on 4 GPUs), runs 3 optimizer steps in a fresh process
and checks that every trainable tensor moved, that the logged learning rate follows the release's
schedule, and that the loss is the release's (the clamped KL for ReNIO).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import make_tokenizer
from renio_pl.models import LoRA, load_model
from renio_pl.module import DistillationModule
from renio_pl.prompt_format import PromptFormat
from renio_pl.rollouts import Rollout
from tests.conftest import save_model, tiny_qwen3
from tests.test_cli import printed_config
from tests.test_opsd import CHARACTERS, THINKING_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"

# --- the ReNIO release's values, per script ----------------------------------------------------
RELEASE = {
    "opd_qwen3_1.7b.yaml": {  # scripts/run_opd_1b.sh
        "student": "Qwen/Qwen3-1.7B", "teacher": "Qwen/Qwen3-8B",
        "threshold": 1.0, "clip": 2.0,  # sh lines 7, 5
        "kl_clamp": 0.05,  # sh line 56
        "grad_clip": 1.0,  # TrainingArguments.max_grad_norm (not passed); accelerate.yaml line 11
        "devices": 4, "batch_size": 8, "accumulate": 1,  # sh lines 8, 2, 1
        "vllm_memory": 0.4,  # sh line 46
    },
    "opsd_qwen3_1.7b.yaml": {  # scripts/run_opsd_1b.sh with README.md lines 47-52
        "student": "Qwen/Qwen3-1.7B", "teacher": None,  # sh line 54, --fixed_teacher
        "threshold": 0.8, "clip": 2.5,  # sh lines 7, 5; README.md lines 49-50
        "kl_clamp": 0.05,  # sh line 55
        "grad_clip": 1.0,
        "devices": 4, "batch_size": 8, "accumulate": 1,
        "vllm_memory": 0.6,  # sh line 44
    },
    "opsd_r1_distill_qwen_7b.yaml": {  # scripts/run_opsd_8b.sh (no 7B script; the nearest size)
        "student": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "teacher": None,
        "threshold": 0.01, "clip": 2.0,  # sh lines 7, 5
        "kl_clamp": 0.06,  # sh line 56
        "grad_clip": 0.1,  # sh line 29
        "devices": 4, "batch_size": 2, "accumulate": 4,  # sh lines 8, 2, 1
        "vllm_memory": 0.5,  # sh line 45
    },
}
# data_collator.py: the student's message (lines 99, 18) and the teacher's (lines 129-135, 26-32)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n"
)


def release_student_message(problem: str) -> str:
    return f"Problem: {problem}\n\n{INSTRUCTION}"


def release_teacher_message(problem: str, solution: str) -> str:
    return (
        f"Problem: {problem}\n\n"
        f"Here is a reference solution to this problem:\n"
        f"=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
        f"{TRANSITION}\n"
        f"{INSTRUCTION}"
    )


def transformers_linear(step: int, total: int, warmup: int = 0) -> float:
    """transformers' get_linear_schedule_with_warmup factor (the ReNIO and REDI releases)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def verl_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """verl's get_cosine_schedule_with_warmup factor (the TRD release)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, math.cos(math.pi * progress) * (1 - min_ratio) * 0.5 + (1 + min_ratio) * 0.5)


@pytest.mark.parametrize("name", RELEASE)
def test_renio_paper_configs_carry_every_release_value(name, capsys):
    release = RELEASE[name]
    printed = printed_config("fit", PAPER / name, capsys)
    trainer, model, data = printed["trainer"], printed["model"], printed["data"]
    assert printed["seed_everything"] == 42  # TrainingArguments.seed
    # precision: fp32 master weights for every trainable weight, the frozen base in bf16
    assert (trainer["precision"], trainer["strategy"], model["dtype"]) == ("bf16-mixed", "ddp", "bfloat16")
    assert model["student_lora"] == {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    assert model["gradient_checkpointing"] is True
    assert (model["student"], model["teacher"]) == (release["student"], release["teacher"])
    # the loss and its clamp
    assert model["loss"] == {"class_path": "renio_pl.losses.ForwardKL",
                             "init_args": {"clamp": release["kl_clamp"], "reduction": "sample"}}
    # ReNIO's settings (opsd_trainer.py lines 544-579)
    assert model["weighter"] == {"class_path": "renio_pl.weighters.ReNIOWeighter", "init_args": {
        "threshold": release["threshold"], "clip": release["clip"], "temperature": 1.0, "normalization": "batch_mean",
        "cap": 10.0, "scope": "micro_batch", "ema_alpha": 0.1, "clip_before_threshold": True}}
    # optimiser, schedule, clipping: TrainingArguments defaults unless the script passes them
    optimizer = model["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert (optimizer["init_args"]["lr"], optimizer["init_args"]["betas"], optimizer["init_args"]["eps"],
            optimizer["init_args"]["weight_decay"]) == (5e-6, [0.9, 0.999], 1e-8, 0.0)
    assert model["lr_scheduler"] == {"class_path": "renio_pl.schedules.WarmupDecay", "init_args": {
        "total_steps": 126, "warmup_steps": 0, "shape": "linear", "min_ratio": 0.0}}
    assert trainer["gradient_clip_val"] == release["grad_clip"] and trainer["max_steps"] == 126
    assert trainer["reload_dataloaders_every_n_epochs"] == 1
    # batch sizes: the global batch of 32 is one optimizer step of one rollout round
    assert (trainer["devices"], data["batch_size"], trainer["accumulate_grad_batches"]) == (
        release["devices"], release["batch_size"], release["accumulate"])
    assert data["prompts_per_epoch"] == 32 == data["batch_size"] * trainer["devices"] * trainer["accumulate_grad_batches"]
    # sampling
    assert data["sampling"] == {"n": 1, "temperature": 1.1, "top_p": 0.95, "top_k": 20, "max_new_tokens": 1024}
    assert data["engine"] == {"class_path": "renio_pl.vllm_engine.VLLMGenerator", "init_args": {
        "max_model_len": 20000, "gpu_memory_utilization": release["vllm_memory"], "kv_cache_gib": None,
        "enforce_eager": False, "enable_prefix_caching": True, "engine_kwargs": None}}
    assert (data["max_prompt_tokens"], data["long_prompts"]) == (20000 - 1024, "drop")
    # data and prompts: the teacher (separate in OPD) reads the reference solution, thinking on
    assert (data["train_path"], data["split"]) == ("siyanzhao/Openthoughts_math_30k_opsd", "train")
    assert (data["prompt_field"], data["solution_field"], data["answer_field"]) == ("problem", "solution", None)
    student, teacher = data["prompt_format"], data["teacher_prompt_format"]
    assert student["template"].format(problem="What is 1+1?") == release_student_message("What is 1+1?")
    assert teacher["template"].format(problem="What is 1+1?", solution="1+1=2.") == release_teacher_message(
        "What is 1+1?", "1+1=2.")
    assert (student["system"], teacher["system"]) == (None, None)
    assert student["chat_template_kwargs"] == {"enable_thinking": False}  # data_collator.py line 104
    assert teacher["chat_template_kwargs"] == {"enable_thinking": True}  # data_collator.py line 140
    assert any(c["class_path"].endswith("LearningRateMonitor") for c in trainer["callbacks"])


def test_the_release_teacher_message_has_its_blank_lines():
    """The blank lines the issue names: two before the transition text, one before the instruction."""
    message = release_teacher_message("P", "S")
    assert "=== Reference Solution End ===\n\n\nAfter reading" in message
    assert "doesn't work out:\n\nPlease reason" in message


def test_trd_paper_configs_keep_fp32_master_weights_the_token_reduction_and_the_release_schedule(capsys):
    for name in ("trd_qwen3_1.7b_opd.yaml", "trd_qwen3_1.7b_opsd.yaml"):
        printed = printed_config("fit", PAPER / name, capsys)
        assert printed["trainer"]["precision"] == "bf16-mixed" and printed["model"]["dtype"] == "bfloat16"
        assert printed["model"]["loss"]["init_args"]["reduction"] == "token"  # kl_trainer.py, _compute_kl_loss
        schedule = printed["model"]["lr_scheduler"]["init_args"]
        total = schedule["total_steps"]  # the release's step count; the OPD data's last, partial one is not trained
        assert total - 1 <= printed["trainer"]["max_steps"] <= total
        assert schedule == {"total_steps": total, "warmup_steps": int(0.1 * total), "shape": "cosine", "min_ratio": 0.1}


def test_opd_with_a_separate_teacher_reads_the_reference_solution(tmp_path, capsys):
    """The OPD paper config's teacher context: the 8B teacher scores the student's tokens after the privileged prompt."""
    config = printed_config("fit", PAPER / "opd_qwen3_1.7b.yaml", capsys)["data"]  # its prompt fragments included
    tokenizer = make_tokenizer(CHARACTERS, THINKING_TEMPLATE)
    for name, seed in (("student", 0), ("teacher", 1)):
        tiny_qwen3(seed, len(tokenizer)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{"problem": f"What is {a}+1?", "solution": f"Add one: {a + 1}."} for a in range(2)]
    data = OnPolicyDataModule(
        str(write_jsonl(tmp_path / "train.jsonl", rows)), tokenizer=str(tmp_path / "student"), prompt_field="problem",
        answer_field=None, solution_field="solution", prompt_format=PromptFormat(**config["prompt_format"]),
        teacher_prompt_format=PromptFormat(**config["teacher_prompt_format"]), prompts_per_epoch=2, batch_size=2)
    data.setup("fit")
    student_prompt, teacher_prompt = (tokenizer.decode(data.train_prompt_ids[0]),
                                      tokenizer.decode(data.train_teacher_prompt_ids[0]))
    assert student_prompt.endswith("<think>\n\n</think>\n\n") and "Add one" not in student_prompt  # thinking off
    assert release_teacher_message("What is 0+1?", "Add one: 1.") in teacher_prompt
    assert teacher_prompt.endswith("<|im_start|>assistant\n")  # thinking on
    module = DistillationModule(str(tmp_path / "student"), str(tmp_path / "teacher"), dtype="float32",
                                student_lora=LoRA(r=4, alpha=8), diagnostics=None)
    completions = [[40, 41, 42], [50, 51]]
    batch = data._collate([Rollout(data.train_prompt_ids[i], c, i, 1.1, teacher_prompt_ids=data.train_teacher_prompt_ids[i])
                           for i, c in enumerate(completions)])
    scores = module.score(batch)
    teacher = load_model(str(tmp_path / "teacher"))  # the separate teacher, by hand
    with torch.no_grad():
        for i, completion in enumerate(completions):
            privileged = data.train_teacher_prompt_ids[i]
            logits = teacher(torch.tensor([privileged + completion])).logits[0, len(privileged) - 1 : -1]
            expected = torch.log_softmax(logits / 1.1, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            assert_close(scores.teacher_logprobs[i, : len(completion)], expected, atol=1e-5, rtol=1e-5)
            plain = data.train_prompt_ids[i]  # not what it scores: the student's own prompt
            logits = teacher(torch.tensor([plain + completion])).logits[0, len(plain) - 1 : -1]
            other = torch.log_softmax(logits / 1.1, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            assert not torch.allclose(scores.teacher_logprobs[i, : len(completion)], other, atol=1e-3)


# --- the rehearsal ---------------------------------------------------------------------------------
REHEARSALS = {  # config -> (CLI, engine): the vLLM engine for one config, the HF engine for the rest
    "opd_qwen3_1.7b.yaml": ("renio-pl", "hf"),
    "opsd_qwen3_1.7b.yaml": ("renio-pl", "vllm"),
    "opsd_r1_distill_qwen_7b.yaml": ("renio-pl", "hf"),
    "trd_qwen3_1.7b_opd.yaml": ("renio-pl", "hf"),
    "trd_qwen3_1.7b_opsd.yaml": ("renio-pl", "hf"),
    "redi_qwen2.5_math_1.5b_sft.yaml": ("renio-pl-redi", "none"),
    "redi_qwen2.5_math_1.5b_redi.yaml": ("renio-pl-redi", "none"),
}
STEPS = 3


def rehearse(config: str, overrides: list[str], cli: str, out: str) -> None:
    """Subprocess body: build the run from `config` + `overrides`, fit, and write what the test checks to `out`."""
    from renio_pl.cli import RenioArgumentParser, RenioCLI
    from renio_pl.datamodule import OnPolicyDataModule
    from renio_pl.errors import ConfigError
    from renio_pl.module import DistillationModule

    if cli == "renio-pl-redi":
        from renio_pl.offline.cli import OfflineArgumentParser as Parser
        from renio_pl.offline.cli import OfflineCLI as CLI
        from renio_pl.offline.datamodule import TraceDataModule as Data
        from renio_pl.offline.module import OfflineDistillationModule as Model
    else:
        CLI, Parser, Data, Model = RenioCLI, RenioArgumentParser, OnPolicyDataModule, DistillationModule
    run = CLI(Model, Data, parser_class=Parser, run=False, save_config_kwargs={"overwrite": True},
                   args=["--config", config, *overrides])
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    result: dict = {"dtypes": sorted({str(p.dtype) for p in before.values()})}
    try:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    except ConfigError as error:
        result["error"] = str(error)
    after = dict(run.model.named_parameters())
    result["changed"] = {n: (after[n].detach() != p).float().mean().item() for n, p in before.items()}
    result["steps"] = run.trainer.global_step
    result["metrics"] = str(Path(run.trainer.logger.log_dir) / "metrics.csv")
    result["min_abs"] = {n: p.abs().min().item() for n, p in before.items()}
    if cli == "renio-pl":  # the instantiated token loss on one fixed position, and its reduction
        loss = run.model.loss
        generator = torch.Generator().manual_seed(0)
        student = torch.log_softmax(3 * torch.randn(1, 50, generator=generator), -1)
        teacher = torch.log_softmax(3 * torch.randn(1, 50, generator=generator), -1)
        result["probe"] = {"student": student.tolist(), "teacher": teacher.tolist(),
                           "loss": loss(student, teacher, torch.zeros(1, dtype=torch.long)).item(),
                           "reduction": loss.reduction}
    Path(out).write_text(json.dumps(result))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def rehearsal_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rehearsal")
    problems = [{"problem": f"What is {a}+{a + 1}?", "solution": f"{a}+{a + 1} = {2 * a + 1}.",
                 "answer": str(2 * a + 1)} for a in range(48)]
    traces = [{"prompt": f"What is {a}+{a}?", "positive": f"It is {2 * a}.", "negative": f"It is {2 * a + 1}."}
              for a in range(64)]
    return {"student": save_model(root / "student", 0), "teacher": save_model(root / "teacher", 1),
            "problems": write_jsonl(root / "problems.jsonl", problems),
            "traces": write_jsonl(root / "traces.jsonl", traces)}


def swaps(config: Path, inputs: dict[str, Path], folder: Path, engine: str) -> list[str]:
    """Only model ids, data, lengths, engine, accelerator and output folders; the rest is the file's."""
    name, text = config.name, config.read_text()
    args = ["--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.max_steps={STEPS}",
            f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            f"--model.student={inputs['student']}"]
    if name.startswith("redi"):
        return args + [f"--data.train_path={inputs['traces']}", f"--trainer.callbacks.folder={folder / 'student'}"]
    if "\n  teacher:" in text:
        args.append(f"--model.teacher={inputs['teacher']}")
    devices = int(text.split("\n  devices: ")[1].split()[0])
    prompts = int(text.split("\n  prompts_per_epoch: ")[1].split()[0])
    args += [f"--data.train_path={inputs['problems']}", "--data.sampling.max_new_tokens=4",
             "--data.max_prompt_tokens=2000", f"--data.prompts_per_epoch={prompts // devices}"]  # one process's share
    if "\n  val_path:" in text:
        args += [f"--data.val_path={inputs['problems']}", "--data.val_sampling.max_new_tokens=4"]
    if "\n  refiner:" in text:
        args += ["--data.refiner.sampling.max_new_tokens=4"]
        if "VLLMGenerator" in text.split("\n  refiner:")[1].split("\n  sampling:")[0]:
            args += ["--data.refiner.engine=renio_pl.rollouts.HFGenerator"]
    if engine == "vllm":
        args += ["--data.engine.max_model_len=1024", "--data.engine.kv_cache_gib=0.25", "--data.engine.enforce_eager=true"]
    else:
        args += ["--data.engine=renio_pl.rollouts.HFGenerator"]
    return args


def run_rehearsal(config: Path, name: str, inputs: dict[str, Path], folder: Path, prelude: str = "") -> dict:
    """`rehearse` in a fresh process (`prelude`: code run first there); `name` is the paper config `config` stands for."""
    cli, engine = REHEARSALS[name]
    out = folder / "rehearsal.json"
    code = (f"{prelude}from tests.test_paper_configs import rehearse; rehearse({str(config)!r}, "
            f"{swaps(config, inputs, folder, engine)!r}, {cli!r}, {str(out)!r})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0 and out.is_file(), output[-4000:]
    return json.loads(out.read_text())


def logged_learning_rates(metrics: str) -> dict[int, float]:
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-AdamW")]
    return {int(row["step"]): float(row["lr-AdamW"]) for row in rows}


def release_learning_rate(name: str, step: int) -> float:
    """The release's learning rate at optimizer step `step` for the full-size run of `name`."""
    if name.startswith(("opd", "opsd")):  # TrainingArguments: linear to 0 over max_steps 126, no warm-up
        return 5e-6 * transformers_linear(step, 126)
    if name.startswith("trd"):  # verl cosine, warm-up int(0.1 T), floor 0.1
        total = 59 if "opd" in name else 315  # ceil(ceil(N / 8) / 16) for MATH train's 7,474 and DeepScaleR's 40,315
        return 5e-6 * verl_cosine(step, total, int(0.1 * total), 0.1)
    total, lr = (3035, 5e-5) if "sft" in name else (1662, 1e-6)  # HF linear, warm-up ceil(0.1 T)
    return lr * transformers_linear(step, total, math.ceil(0.1 * total))


def check_rehearsal(name: str, result: dict) -> None:
    """What a correct run of `name` must show: the assertions a wrong config fails."""
    assert "error" not in result, result.get("error")
    assert result["steps"] == STEPS
    lora = name.startswith(("opd", "opsd", "trd"))
    assert result["dtypes"] == ["torch.float32"]  # fp32 (master) weights for every trainable tensor
    logged = logged_learning_rates(result["metrics"])
    assert sorted(logged) == list(range(STEPS)), logged
    for step, lr in logged.items():
        assert lr == pytest.approx(release_learning_rate(name, step), rel=1e-6, abs=1e-15), (step, lr)
    for tensor, changed in result["changed"].items():
        if lora:  # B is 0 at first, so A moves from the second step on: most entries of every adapter tensor by then.
            # A's share is lower under a long warm-up: TRD OPSD's 31 steps give lr 0, 1.6e-7, 3.2e-7, so B is about
            # 1e-7 after step 1 and many of A's step-2 updates fall under fp32's spacing (measured: 34% of one
            # lora_A moved; 51% with 23 warm-up steps). bf16-held adapters move 0.3-1.6%.
            assert changed > (0.25 if "lora_A" in tensor else 0.5), (tensor, changed)
            continue
        # A fully trained student: some entry of each tensor moved (rows of unused tokens stay), unless
        # even fp32 cannot hold the move: AdamW moves an entry by about lr a step, and the warm-up's
        # first learning rates (REDI: 0, 6e-9, 1.2e-8) are below half the spacing of fp32 at 1.0
        # (6e-8), where the norm scales start.
        smallest = result["min_abs"][tensor]
        half_spacing = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(smallest)) / 2 if smallest else 0.0
        assert changed > 0.0 or 2 * sum(logged.values()) < half_spacing, (tensor, changed)
    probe = result.get("probe")
    if probe is None:
        return
    student, teacher = torch.tensor(probe["student"]), torch.tensor(probe["teacher"])
    entries = F.kl_div(student, teacher, reduction="none", log_target=True)  # opsd_trainer.py line 477
    if name.startswith(("opd", "opsd")):  # per-entry clamp (lines 490-491), per-sample mean (lines 989-1001)
        expected = entries.clamp(min=0, max=RELEASE[name]["kl_clamp"]).sum()
        assert probe["reduction"] == "sample"
        assert entries.sum() > 2 * expected  # the probe tells a clamped loss from an unclamped one
    else:  # TRD: forward KL, no clamp, summed over the batch's response tokens
        expected = entries.sum()
        assert probe["reduction"] == "token"
    assert_close(torch.tensor(probe["loss"]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", REHEARSALS)
def test_rehearsal_of_each_paper_config(name, rehearsal_inputs, tmp_path):
    if REHEARSALS[name][1] == "vllm":
        pytest.importorskip("vllm", reason="this config's rehearsal uses the vLLM engine")
    check_rehearsal(name, run_rehearsal(PAPER / name, name, rehearsal_inputs, tmp_path))

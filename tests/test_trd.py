"""TRD: each rollout is rewritten whole by the teacher, and the loss is taken on the rewrite `y_r`."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.testing import assert_close

from renio_pl.cli import RenioArgumentParser, RenioCLI
from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import make_tokenizer
from renio_pl.errors import ConfigError
from renio_pl.logprobs import completion_hidden_states, position_ids
from renio_pl.losses import SampledReverseKL
from renio_pl.models import LoRA, load_model
from renio_pl.module import DistillationModule
from renio_pl.prompt_format import OPSD_STUDENT_TEMPLATE, PromptFormat
from renio_pl.refinement import TRD_OPD_TEMPLATE, TRD_OPSD_TEMPLATE, Refiner
from renio_pl.rollouts import HFGenerator, Rollout, RolloutGenerator, SamplingConfig
from renio_pl.weighters import ReNIOWeighter
from tests.conftest import tiny_qwen3
from tests.test_cli import printed_config
from tests.test_opsd import CHARACTERS, THINKING_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
REWRITE_SAMPLING = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=6)
SOLUTIONS = ["Add them: {1}+2 = 3.", "Twice two is four.", "Count on from 5: six."]


@pytest.fixture(scope="module")
def trd_dirs(tmp_path_factory):
    """Student and teacher folders (two seeds) with a printable-character tokenizer, and data with solutions."""
    root = tmp_path_factory.mktemp("trd")
    tokenizer = make_tokenizer(CHARACTERS, THINKING_TEMPLATE)
    for name, seed in (("student", 0), ("teacher", 1)):
        tiny_qwen3(seed, len(tokenizer)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data = root / "train.jsonl"
    with data.open("w") as f:
        for i, solution in enumerate(SOLUTIONS * 2):
            f.write(json.dumps({"prompt": f"What is {i}+{i + 2}?", "answer": str(2 * i + 2), "solution": solution}) + "\n")
    return {"student": root / "student", "teacher": root / "teacher", "data": data}


def _data(dirs, refiner: Refiner, opsd: bool = False, **kwargs) -> OnPolicyDataModule:
    """Three prompts a round, two rollouts each, one batch of six."""
    options = dict(
        train_path=str(dirs["data"]), tokenizer=str(dirs["student"]), refiner=refiner,
        solution_field="solution" if opsd else None,
        prompt_format=PromptFormat(OPSD_STUDENT_TEMPLATE, chat_template_kwargs={"enable_thinking": False}),
        sampling=SamplingConfig(n=2, max_new_tokens=6), prompts_per_epoch=3, batch_size=6,
    )
    return OnPolicyDataModule(**{**options, **kwargs})


def _fit(module, data, tmp_path, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1,
    )
    trainer.fit(module, data)
    return trainer


class RecordingEngine(HFGenerator):
    """`HFGenerator` that records each call: the model, whether its LoRA adapter was on, prompts, seeds, outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def generate(self, model, tokenizer, prompts_P, sampling, seeds_P):
        completions = super().generate(model, tokenizer, prompts_P, sampling, seeds_P)
        adapters = {not m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer)}
        self.calls.append(dict(model=model, adapter_on=adapters, prompts=prompts_P, seeds=seeds_P, outputs=completions))
        return completions


# --- the rewrite prompt and token alignment ---------------------------------------------------
def test_the_rewrite_prompt_holds_problem_attempt_and_solution_verbatim(trd_dirs):
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING), opsd=True)
    data.setup("fit")
    row, attempt = data.train_rows[0], "x = {problem} and \\boxed{2}"  # braces and a field name stay as written
    expected = TRD_OPSD_TEMPLATE.replace("{problem}", row.problem).replace("{solution}", row.solution)
    expected = expected.replace("{attempt}", attempt).replace("{{}}", "{}")
    text = data.tokenizer.decode(data.refiner.rewrite_prompt(data.tokenizer, row, attempt))
    assert text == f"<|im_start|>user\n{expected}<|im_end|>\n<|im_start|>assistant\n"  # the chat template, thinking on
    assert "{1}+2 = 3." in text and "\\boxed{}." in text
    opd = Refiner(PromptFormat(TRD_OPD_TEMPLATE, chat_template_kwargs={"enable_thinking": False}))
    text = data.tokenizer.decode(opd.rewrite_prompt(data.tokenizer, row, attempt))
    assert attempt in text and row.solution not in text and text.endswith("assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("opsd", [False, True], ids=["opd", "opsd"])
def test_the_teacher_scores_the_rewrite_after_the_rewrite_prompt(trd_dirs, opsd):
    """Token ids, position ids and the first refined token, against unpadded single-row forwards, at temperature 1."""
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING), opsd=opsd)
    data.setup("fit")
    texts = ["3", "It is {4}, as 1+3 = 4.", "six"]  # ragged attempts give ragged rewrite prompts
    attempts = [
        Rollout(data.train_prompt_ids[i], [40 + i], data.train_rows[i].index, 1.0, answer="4", text=t)
        for i, t in enumerate(texts)
    ]
    rows = {row.index: row for row in data.train_rows}
    teacher = load_model(str(trd_dirs["teacher"])).eval()
    refined = data.refiner.refine(attempts, rows, teacher, data.tokenizer, data.engine, seeds_B=[7, 8, 9])
    for attempt, rollout, seed in zip(attempts, refined, [7, 8, 9]):
        assert rollout.prompt_ids == attempt.prompt_ids and rollout.temperature == 1.0
        row = rows[attempt.prompt_index]
        assert rollout.teacher_prompt_ids == data.refiner.rewrite_prompt(data.tokenizer, row, attempt.text)
        alone = HFGenerator().generate(teacher, data.tokenizer, [rollout.teacher_prompt_ids], REWRITE_SAMPLING, [seed])
        assert rollout.completion_ids == alone[0][0]  # y_r is what the rewriter wrote after exactly these ids
    assert len({len(r.teacher_prompt_ids) for r in refined}) == 3
    batch = data._collate(refined)
    assert batch.temperature == 1.0  # sampled at 0.6, scored at TRD's temperature 1
    teacher_ids, teacher_mask, teacher_width = batch.teacher_inputs()
    student_positions, teacher_positions = position_ids(batch.attention_mask), position_ids(teacher_mask)
    for i, r in enumerate(refined):
        n = len(r.completion_ids)
        start = batch.prompt_length - len(r.prompt_ids)
        assert batch.input_ids[i, start : batch.prompt_length + n].tolist() == r.prompt_ids + r.completion_ids
        assert teacher_ids[i, teacher_width - len(r.teacher_prompt_ids) : teacher_width + n].tolist() == (
            r.teacher_prompt_ids + r.completion_ids
        )
        assert student_positions[i, batch.prompt_length].item() == len(r.prompt_ids)  # first refined token, student
        assert teacher_positions[i, teacher_width].item() == len(r.teacher_prompt_ids)  # ... and teacher
    module = DistillationModule(str(trd_dirs["student"]), str(trd_dirs["teacher"]))
    with torch.no_grad():
        scores = module.score(batch)
        for i, r in enumerate(refined):
            n = len(r.completion_ids)
            for model, prompt, got in ((teacher, r.teacher_prompt_ids, scores.teacher_logprobs),
                                       (module.student, r.prompt_ids, scores.student_logprobs)):
                logprobs = model(torch.tensor([prompt + r.completion_ids])).logits[0].log_softmax(-1)[len(prompt) - 1 : -1]
                expected = logprobs.gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]  # (T_i,)
                assert_close(got[i, :n], expected, atol=1e-5, rtol=1e-5)  # the first one from the prompt's last token


# --- the two schedules, in real fits ------------------------------------------------------------
def _logged(trainer) -> dict[str, list[float]]:
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def test_every_round_refines_the_current_students_rollouts_with_the_teacher(trd_dirs, tmp_path):
    engine = RecordingEngine()
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING, schedule="every_round"), engine=engine)
    module = DistillationModule(str(trd_dirs["student"]), str(trd_dirs["teacher"]),
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = _fit(module, data, tmp_path, steps=2)  # two rounds of one step
    calls = engine.calls
    assert [(c["model"] is module.student, c["model"] is module.teacher, len(c["prompts"])) for c in calls] == [
        (True, False, 3), (False, True, 6)] * 2  # each round: the student's 3 x 2 rollouts, then 6 rewrites
    attempts, rewrites = calls[2]["outputs"], calls[3]
    for k, prompt in enumerate(rewrites["prompts"]):  # prompt-major: attempt k is sample k % 2 of prompt k // 2
        assert data.tokenizer.decode(attempts[k // 2][k % 2], skip_special_tokens=True) in data.tokenizer.decode(prompt)
    served = sorted(data._round, key=lambda r: (r.prompt_index, r.sample_index))
    assert [r.completion_ids for r in served] == [output[0] for output in rewrites["outputs"]]
    assert [r.teacher_prompt_ids for r in served] == rewrites["prompts"]
    assert all(r.temperature == 1.0 and r.correct is not None for r in served)  # graded on y_r
    logged = _logged(trainer)
    assert all(math.isfinite(x) for x in logged["train/loss"]) and len(logged["train/loss"]) == 2
    assert len(logged["refine/attempt_accuracy"]) == 2 and logged["refine/left_out"] == [0.0, 0.0]
    assert logged["refine/refined_len_mean"][-1] == sum(len(r.completion_ids) for r in served) / 6
    assert any(not torch.equal(student_before[k], v) for k, v in module.student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())


def test_once_refines_the_initial_students_rollouts_of_every_prompt_and_serves_them_each_round(trd_dirs, tmp_path):
    engine = RecordingEngine()
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING, schedule="once"), engine=engine)
    module = DistillationModule(str(trd_dirs["student"]), str(trd_dirs["teacher"]))
    trainer = _fit(module, data, tmp_path, steps=3)  # three rounds over 6 prompts
    assert [len(c["prompts"]) for c in engine.calls] == [6, 12]  # before the first step, never again
    assert engine.calls[0]["model"] is module.student and engine.calls[1]["model"] is module.teacher
    table = data._refined
    assert sorted(table) == [row.index for row in data.train_rows] and all(len(v) == 2 for v in table.values())
    round_two = [table[data.train_rows[i].index] for i in data.round_prompt_indices(2)]
    assert data._round == [r for rollouts in round_two for r in rollouts]
    assert len(_logged(trainer)["refine/attempt_accuracy"]) == 1
    resumed = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING, schedule="once"), engine=RecordingEngine())
    resumed.load_state_dict(data.state_dict())
    resumed.setup("fit")
    assert resumed._refined == table
    assert resumed.sample_round(5) and not resumed.engine.calls  # served from the restored set, not sampled anew


@pytest.mark.parametrize("lora", [True, False], ids=["lora-adapter-off", "full-frozen-copy"])
def test_opsd_rewrites_with_the_base_weights_that_also_score(trd_dirs, tmp_path, lora):
    engine = RecordingEngine()
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING, schedule="every_round"), opsd=True, engine=engine)
    student = str(trd_dirs["student"])
    module = DistillationModule(student, student_lora=LoRA(r=4, alpha=8) if lora else None,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    _fit(module, data, tmp_path, steps=2)
    student_calls, rewriter_calls = engine.calls[0::2], engine.calls[1::2]
    if lora:
        assert all(c["adapter_on"] == {True} for c in student_calls)
        assert all(c["model"] is module.student and c["adapter_on"] == {False} for c in rewriter_calls)
    else:
        assert all(c["model"] is module.teacher for c in rewriter_calls)
    assert all(SOLUTIONS[0] in data.tokenizer.decode(p) or SOLUTIONS[1] in data.tokenizer.decode(p)
               or SOLUTIONS[2] in data.tokenizer.decode(p) for p in rewriter_calls[-1]["prompts"])
    base = load_model(student).eval()  # the weights before training
    last = rewriter_calls[-1]
    alone = HFGenerator().generate(base, data.tokenizer, last["prompts"], REWRITE_SAMPLING, last["seeds"])
    assert alone == last["outputs"]  # the base weights wrote y_r, after a round of training
    batch = data._collate(data._round)
    with torch.no_grad():
        hidden = completion_hidden_states(base, *batch.teacher_inputs())
        by_hand = base.get_output_embeddings()(hidden).log_softmax(-1).gather(2, batch.completion_ids[..., None])[..., 0]
        assert_close(module.score(batch).teacher_logprobs, by_hand * batch.completion_mask, atol=1e-5, rtol=1e-5)


# --- refused combinations -------------------------------------------------------------------------
class _OtherEngine(RolloutGenerator):
    def generate(self, model, tokenizer, prompts_P, sampling, seeds_P):
        raise AssertionError("never called")


@pytest.mark.parametrize(
    "module_kwargs, engine, message",
    [
        (dict(loss=SampledReverseKL()), None, "model.loss: SampledReverseKL is a policy gradient over tokens the student"),
        (dict(weighter=ReNIOWeighter()), None, "model.weighter: ReNIOWeighter reads the student's choices"),
        ({}, _OtherEngine(), "the OPD rewriter \\(model.teacher\\) needs an engine of its own"),
    ],
    ids=["sampled-reverse-kl", "renio-weighter", "opd-shared-non-hf-engine"],
)
def test_combinations_that_assume_student_samples_or_share_an_engine_are_refused(
    trd_dirs, tmp_path, module_kwargs, engine, message
):
    module = DistillationModule(str(trd_dirs["student"]), str(trd_dirs["teacher"]), **module_kwargs)
    data = _data(trd_dirs, Refiner(sampling=REWRITE_SAMPLING), **({"engine": engine} if engine else {}))
    with pytest.raises(ConfigError, match=message) as error:
        _fit(module, data, tmp_path, steps=1)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "refiner, opsd, message",
    [
        (lambda: Refiner(PromptFormat("{problem} {solution} {attempt}"), REWRITE_SAMPLING), False,
         "has \\{solution\\}, but the data has none: set data.solution_field"),
        (lambda: Refiner(PromptFormat("{problem} {attempt}"), REWRITE_SAMPLING), True,
         "must contain \\{solution\\} for OPSD"),
        (lambda: Refiner(PromptFormat("{problem} {answer}")), False,
         "may use \\{problem\\}, \\{attempt\\} and \\{solution\\}; got answer"),
        (lambda: Refiner(sampling=SamplingConfig(n=2)), False, "sampling.n must be 1 \\(one rewrite per rollout\\); got 2"),
        (lambda: Refiner(sampling=SamplingConfig(max_new_tokens=7)), False,
         "max_new_tokens=7 is over data.sampling.max_new_tokens=6"),
        (lambda: Refiner(schedule="sometimes"), False, "schedule must be once or every_round; got 'sometimes'"),
    ],
)
def test_bad_refiner_settings_are_refused_before_any_weights_load(trd_dirs, refiner, opsd, message):
    with pytest.raises(ConfigError, match=message):
        _data(trd_dirs, refiner(), opsd=opsd)


def test_the_cli_refuses_a_bad_combination_in_one_line(model_dirs, prompt_file, tmp_path, capsys):
    from renio_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo_trd.yaml"), "--model.student", str(model_dirs["student"]),
              "--model.teacher", str(model_dirs["teacher"]), "--data.train_path", str(prompt_file),
              "--data.val_path", "null", "--model.weighter", "ReNIOWeighter", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: model.weighter: ReNIOWeighter reads")


# --- shipped configs --------------------------------------------------------------------------------
TRD_PAPER = ["trd_qwen3_1.7b_opd.yaml", "trd_qwen3_1.7b_opsd.yaml"]
AUTHORS_SAMPLING = {"n": 1, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 16384}


def release_steps(problems: int, gpus: int = 8, accumulation: int = 16) -> int:
    """The TRD release's optimizer steps for one epoch: ceil(len(loader) / accumulation) (kl_trainer.py,
    KLTrainer.__init__), a DistributedSampler without drop_last giving each GPU ceil(N / gpus) batches of 1."""
    return math.ceil(math.ceil(problems / gpus) / accumulation)


# config -> (training problems, data path, answer field, full rounds trained): OPD on MATH train offline
# (7,474: 58 full rounds of the release's 59 steps), OPSD on DeepScaleR as the release (40,315: 315).
TRD_DATA = {
    "trd_qwen3_1.7b_opd.yaml": (7474, "evaluation/data/train/math_train_deepscaler.jsonl", "answer", 58),
    "trd_qwen3_1.7b_opsd.yaml": (40315, "agentica-org/DeepScaleR-Preview-Dataset", "answer", 315),
}


@pytest.mark.parametrize("name", TRD_PAPER)
def test_paper_trd_configs_carry_the_authors_settings(name, capsys):
    """Every value of the release's run (recipe/opd/run/{opd,opsd}/math/qwen3-1.7B/forward_kl_y_r.sh over
    run_config.py, launch_training.py, config.py, kl_trainer.py, prepare_training_data.py)."""
    printed = printed_config("fit", ROOT / "configs" / "paper" / name, capsys)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    # LoRA r 64 / alpha 128 on the 7 projections; no dropout (verl's engine never passes config.py's 0.05)
    assert model["student"] == "Qwen/Qwen3-1.7B" and model["student_lora"] == {
        "r": 64, "alpha": 128, "dropout": 0.0, "target_modules": "all-linear"}
    assert (model["dtype"], trainer["precision"]) == ("bfloat16", "bf16-mixed")  # bf16 compute, fp32 trainables
    assert model["gradient_checkpointing"] is True
    # AdamW lr 5e-6 (not config.py's 2e-5), betas (0.9, 0.95), weight decay 0.005 (not 0.01), clip 1.0
    optimizer = model["optimizer"]["init_args"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert (optimizer["lr"], optimizer["betas"], optimizer["weight_decay"]) == (5e-6, [0.9, 0.95], 0.005)
    assert trainer["gradient_clip_val"] == 1.0
    # forward KL at temperature 1, no clip (KL_TOKEN_CLIP 0, not config.py's 0.1), token reduction
    assert model["loss"] == {"class_path": "renio_pl.losses.ForwardKL", "init_args": {"clamp": None, "reduction": "token"}}
    assert model["weighter"]["class_path"] == "renio_pl.weighters.UniformWeighter"
    # batch: 8 GPUs x 1 x 16 accumulation steps = one round of 128 per optimizer step
    assert (trainer["devices"], data["batch_size"], trainer["accumulate_grad_batches"]) == (8, 1, 16)
    assert data["prompts_per_epoch"] == 128
    # sampling of y_o and y_r, one each per problem
    refiner = data["refiner"]["init_args"]
    assert data["sampling"] == AUTHORS_SAMPLING == refiner["sampling"]
    assert refiner["schedule"] == "once" and refiner["score_temperature"] == 1.0
    # schedule: verl's cosine over the release's step count, warm-up int(0.1 T), floor 0.1 x lr
    problems, path, answer, rounds = TRD_DATA[name]
    total = release_steps(problems)
    assert model["lr_scheduler"] == {"class_path": "renio_pl.schedules.WarmupDecay", "init_args": {
        "total_steps": total, "warmup_steps": int(0.1 * total), "shape": "cosine", "min_ratio": 0.1}}
    assert trainer["max_steps"] == rounds <= total  # full rounds of 128 only: the OPD data leaves a 59th of 7 x 8
    # data and prompts: student prompts over 2,048 tokens dropped (OPSD: the solution prompt bounded too)
    assert data["train_path"].endswith(path) and (data["prompt_field"], data["answer_field"]) == ("problem", answer)
    opsd = "opsd" in name
    assert (data["max_prompt_tokens"], data["long_prompts"]) == (4096 if opsd else 2048, "drop")
    assert model["teacher"] == (None if opsd else "Qwen/Qwen3-8B")
    assert data["solution_field"] == ("solution" if opsd else None)
    thinking = data["prompt_format"]["chat_template_kwargs"]
    assert thinking == {"enable_thinking": True}  # the release's chat requests: Qwen3's default
    assert refiner["prompt_format"]["chat_template_kwargs"] == thinking  # y_r fits after the student's prompt
    assert refiner["prompt_format"]["template"] == (TRD_OPSD_TEMPLATE if opsd else TRD_OPD_TEMPLATE)


def test_release_step_counts_by_hand():
    # 7,474 problems: 935 batches a GPU, 58 full steps of 16 and a 59th of 7; 40,315: 5,040 = 315 x 16
    assert (release_steps(7474), release_steps(40315)) == (59, 315)


class _BuildOnly(RenioCLI):
    """Instantiates the model and data from a config (the trainer is left out: the paper configs ask for GPUs)."""

    def instantiate_trainer(self, **kwargs):
        return None


@pytest.mark.parametrize("name", TRD_PAPER)
def test_paper_trd_configs_instantiate_on_tiny_local_models(name, model_dirs):
    """Every component is built (models swapped for local tiny ones); the schedule is the authors' shape."""
    pytest.importorskip("vllm", reason="the paper configs use the vLLM engine")
    teacher = [] if "opsd" in name else ["--model.teacher", str(model_dirs["teacher"])]
    cli = _BuildOnly(DistillationModule, OnPolicyDataModule, parser_class=RenioArgumentParser, run=False,
                     args=["--config", str(ROOT / "configs" / "paper" / name), "--model.student", str(model_dirs["student"]),
                           *teacher])
    refiner = cli.datamodule.refiner
    assert isinstance(refiner, Refiner) and refiner.schedule == "once" and refiner.sampling.temperature == 0.6
    assert type(refiner.engine).__name__ == ("VLLMGenerator" if teacher else "NoneType")
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.005
    lrs = []
    for _ in range(scheduler.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm_up = round(0.1 * scheduler.total_steps)
    assert lrs[0] < 1e-8 and max(lrs) == pytest.approx(5e-6, rel=1e-3) and lrs.index(max(lrs)) in (warm_up - 1, warm_up)
    last = (scheduler.total_steps - 1 - scheduler.warmup_steps) / (scheduler.total_steps - scheduler.warmup_steps)
    assert lrs[-1] == pytest.approx(5e-6 * (0.1 + 0.9 * (1 + math.cos(math.pi * last)) / 2))  # cosine down to 0.1x
    assert all(a >= b for a, b in zip(lrs[warm_up:], lrs[warm_up + 1 :]))
    assert {n for n, p in cli.model.student.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in cli.model.student.named_parameters() if p.requires_grad)


def test_the_trd_demo_config_parses(capsys):
    printed = printed_config("fit", ROOT / "configs" / "demo_trd.yaml", capsys)
    refiner = printed["data"]["refiner"]["init_args"]
    assert refiner["prompt_format"]["template"] == "{problem}" and refiner["schedule"] == "every_round"


# --- vLLM: the rollout engine rewrites too (OPSD), or a second engine holds the OPD teacher ------------
def run_vllm_fit(student: str, teacher: str | None, data: str, folder: str) -> None:
    """Two rounds with vLLM engines; then the last rewrites again from the rewriter's weights (subprocess body)."""
    from renio_pl.vllm_engine import VLLMGenerator

    class Recording(VLLMGenerator):
        calls: list = []

        def generate(self, model, tokenizer, prompts_P, sampling, seeds_P):
            out = super().generate(model, tokenizer, prompts_P, sampling, seeds_P)
            self.calls.append((prompts_P, seeds_P, out))
            return out

    def engine():
        return Recording(max_model_len=1024, kv_cache_gib=0.25, enforce_eager=True)

    rewriter_engine = engine() if teacher else None
    sampling = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=6)
    refiner = Refiner(sampling=sampling, schedule="every_round", engine=rewriter_engine)
    data_module = _data({"data": data, "student": student}, refiner, opsd=teacher is None, engine=engine())
    lora = None if teacher else LoRA(r=4, alpha=8)
    module = DistillationModule(student, teacher, student_lora=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    _fit(module, data_module, Path(folder), steps=2)
    calls, (prompts, seeds, outputs) = len(Recording.calls), Recording.calls[-1]
    rewriter = load_model(teacher or student).eval()  # the OPD teacher, or the base weights
    check = (rewriter_engine or data_module.engine).generate(rewriter, data_module.tokenizer, prompts, sampling, seeds)
    assert check == outputs and [r.completion_ids for r in sorted(
        data_module._round, key=lambda r: (r.prompt_index, r.sample_index))] == [o[0] for o in outputs]
    print("vllm trd ok", calls)


@pytest.mark.slow
@pytest.mark.parametrize("opd", [False, True], ids=["opsd-shared-engine", "opd-second-engine"])
def test_trd_with_the_vllm_engine(trd_dirs, tmp_path, opd):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    teacher = repr(str(trd_dirs["teacher"])) if opd else "None"
    code = (f"from tests.test_trd import run_vllm_fit; run_vllm_fit({str(trd_dirs['student'])!r}, {teacher}, "
            f"{str(trd_dirs['data'])!r}, {str(tmp_path)!r})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vllm trd ok 4" in done.stdout  # two rounds: the student's rollouts, then the rewrites


# --- the token reduction's count, as the release takes it: each micro-step over every process -----
class StepGradients(pl.Callback):
    """Per rank: the batches of the first optimizer step and its gradient before the update (`folder/step.rank<r>.pt`)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.batches = Path(folder), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: _full(p.grad).detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}
            torch.save({"batches": self.batches, "grads": grads}, self.folder / f"step.rank{trainer.global_rank}.pt")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2's sharded gradients gathered (a collective, on every rank)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _token_module(dirs: dict[str, Path]) -> DistillationModule:
    from renio_pl.losses import ForwardKL
    from renio_pl.weighters import UniformWeighter

    return DistillationModule(str(dirs["student"]), str(dirs["teacher"]), weighter=UniformWeighter(),
                              loss=ForwardKL(reduction="token"), diagnostics=None, evaluate_before_fit=False)


def _summed_token_losses(module: DistillationModule, batch) -> tuple[torch.Tensor, int]:
    """Each micro-batch's summed token KL (with grad) and its generated tokens, scored by `module`."""
    mask = batch.completion_mask
    return (module.score(batch).token_loss * mask).sum(), int(mask.sum())


def _reference_gradient(dirs, micro_steps: list[list], pooled_over_step: bool = False) -> dict[str, torch.Tensor]:
    """One process's gradient by hand: `(1 / G) sum_a S_a / N_a` over the `G` micro-steps, each micro-step's
    batches (one per rank) pooled; `pooled_over_step`: `sum_a S_a / sum_a N_a` instead (not the release's)."""
    module = _token_module(dirs)
    sums = [[_summed_token_losses(module, batch) for batch in step] for step in micro_steps]
    S = [sum(s for s, _ in step) for step in sums]  # noqa: N806
    N = [sum(n for _, n in step) for step in sums]  # noqa: N806
    loss = sum(S) / sum(N) if pooled_over_step else sum(s / n for s, n in zip(S, N)) / len(micro_steps)
    loss.backward()
    return {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None}


def _assert_gradients(got: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def _differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-6) for n in a)


@pytest.mark.parametrize("layout", ["two-micro-batches", "one-batch"])
def test_token_reduction_one_process_with_gradient_accumulation_matches_the_release_by_hand(model_dirs, tmp_path, layout):
    """Rollouts of 1 and 4 generated tokens. Two micro-batches of one step (accumulate_grad_batches 2):
    the release's `(S_1 / 1 + S_2 / 4) / 2`, each micro-step its own count. One batch of both:
    `(S_1 + S_2) / 5`."""
    from renio_pl.rollouts import collate_rollouts
    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    prompt = tokenizer("What is 2+3?")["input_ids"]
    rollouts = [Rollout(prompt, [5], 0, 1.0), Rollout(prompt[:-2], [7, 8, 9, 10], 1, 1.0)]
    groups = [[rollouts[0]], [rollouts[1]]] if layout == "two-micro-batches" else [rollouts]
    batches = [collate_rollouts(group, tokenizer.pad_token_id) for group in groups]
    assert [int(b.completion_mask.sum()) for b in batches] == ([1, 4] if len(batches) == 2 else [5])
    module = _token_module(model_dirs)
    recorder = StepGradients(str(tmp_path))
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=len(batches), accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(module, train_dataloaders=loader)
    got = torch.load(tmp_path / "step.rank0.pt", weights_only=False)["grads"]
    steps = [[b] for b in batches]  # one process: each micro-step is one batch
    expected = _reference_gradient(model_dirs, steps)
    _assert_gradients(got, expected)
    if len(batches) == 2:  # the count of the whole step instead, (S_1 + S_2) / 5, is another gradient
        assert _differ(expected, _reference_gradient(model_dirs, steps, pooled_over_step=True))


@pytest.fixture(scope="module")
def stopping_student(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """The tiny student with a third of the vocabulary as EOS, so its rollouts stop at varied lengths."""
    from tests.conftest import save_model

    folder = save_model(tmp_path_factory.mktemp("stopping") / "student", 0)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(1, 26))
    (folder / "generation_config.json").write_text(json.dumps(config))
    return {"student": folder, "teacher": model_dirs["teacher"]}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_token_reduction_on_two_processes_equals_one_process_on_their_union(stopping_student, prompt_file, tmp_path,
                                                                            strategy):
    """A real 2-process fit (gloo; DDP, or FSDP2 through the shipped overlay), accumulate_grad_batches 2: its first
    step's gradient, on both ranks, is one process's `(1 / 2) sum_a (S_0a + S_1a) / (N_0a + N_1a)` over both
    ranks' micro-batches."""
    from tests.conftest import small_fit

    recorder = {"class_path": "tests.test_trd.StepGradients", "init_args": {"folder": str(tmp_path)}}
    overlay = ["--config", str(ROOT / "configs" / "strategies" / f"{strategy}.yaml")]
    if strategy == "fsdp":
        overlay += ["--trainer.strategy.init_args.data_parallel_size", "2"]
    done = small_fit(
        stopping_student, prompt_file, tmp_path, [recorder], *overlay,
        trainer={"devices": 2, "accumulate_grad_batches": 2, "max_steps": 1},
        model={"weighter": {"class_path": "renio_pl.weighters.UniformWeighter"},
               "loss": {"class_path": "renio_pl.losses.ForwardKL", "init_args": {"reduction": "token"}},
               "diagnostics": None, "lr_scheduler": None},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"step.rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [len(r["batches"]) for r in ranks] == [2, 2]  # 8 rollouts, 4 a rank in batches of 2: one step
    micro_steps = [[ranks[0]["batches"][a], ranks[1]["batches"][a]] for a in range(2)]
    counts = [[int(b.completion_mask.sum()) for b in step] for step in micro_steps]
    assert any(step[0] != step[1] for step in counts), f"equal counts {counts} would not tell the reductions apart"
    expected = _reference_gradient(stopping_student, micro_steps)
    for rank in (0, 1):
        _assert_gradients(ranks[rank]["grads"], expected)
    # each rank's own token mean, averaged over the ranks (what the count of one rank's tokens gives): another gradient
    module = _token_module(stopping_student)
    per_rank = [[_summed_token_losses(module, batch) for batch in step] for step in micro_steps]
    (sum(s / n for step in per_rank for s, n in step) / 4).backward()
    assert _differ(expected, {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None})

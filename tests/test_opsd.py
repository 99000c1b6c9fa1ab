"""OPSD: the teacher (the student's base weights) scores the student's completion tokens after a privileged prompt."""

from __future__ import annotations

import json
import string

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import make_tokenizer
from renio_pl.errors import ConfigError
from renio_pl.logprobs import completion_hidden_states, position_ids
from renio_pl.models import LoRA, load_model
from renio_pl.module import DistillationModule
from renio_pl.prompt_format import OPSD_STUDENT_TEMPLATE, OPSD_TEACHER_TEMPLATE, PromptFormat
from renio_pl.rollouts import Rollout, SamplingConfig
from tests.conftest import tiny_qwen3

# Qwen3's chat template in miniature: thinking off pre-fills an empty think block.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CHARACTERS = string.printable + "\u2014"
SOLUTIONS = ["Add the two numbers: 1+2=3.", "Twice two is four, so 4.", "Count on from 5: six."]


@pytest.fixture(scope="module")
def opsd_dirs(tmp_path_factory):
    """A student folder whose tokenizer has a thinking chat template, and OPSD data with solutions."""
    root = tmp_path_factory.mktemp("opsd")
    tokenizer = make_tokenizer(CHARACTERS, THINKING_TEMPLATE)
    tiny_qwen3(0, len(tokenizer)).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    data = root / "train.jsonl"
    with data.open("w") as f:
        for i, solution in enumerate(SOLUTIONS * 2):
            f.write(json.dumps({"prompt": f"Problem {i}: what is {i}+{10 ** i}?", "answer": str(i + 10 ** i), "solution": solution}) + "\n")
    return {"student": root / "student", "data": data}


def _data_module(opsd_dirs, teacher_format: PromptFormat | None = None, student_thinking: bool = False, **kwargs):
    options = dict(
        train_path=str(opsd_dirs["data"]), tokenizer=str(opsd_dirs["student"]), solution_field="solution",
        prompt_format=PromptFormat(OPSD_STUDENT_TEMPLATE, chat_template_kwargs={"enable_thinking": student_thinking}),
        sampling=SamplingConfig(n=2, max_new_tokens=6), prompts_per_epoch=6, batch_size=6,
    )
    if teacher_format is not None:
        options["teacher_prompt_format"] = teacher_format
    return OnPolicyDataModule(**options, **kwargs)


def test_the_default_teacher_prompt_is_the_authors_with_thinking_on(opsd_dirs):
    data = _data_module(opsd_dirs)
    data.setup("fit")
    tokenizer = data.tokenizer
    student = tokenizer.decode(data.train_prompt_ids[0])
    teacher = tokenizer.decode(data.train_teacher_prompt_ids[0])
    assert student.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert teacher.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")  # thinking on
    assert "=== Reference Solution Begin ===\n" + SOLUTIONS[0] + "\n=== Reference Solution End ===" in teacher
    assert SOLUTIONS[0] not in student and "Problem: Problem 0: what is 0+1?" in student
    assert data.teacher_prompt_format.template == OPSD_TEACHER_TEMPLATE


@pytest.mark.parametrize("template", [OPSD_TEACHER_TEMPLATE, "Q: {problem}\nKnown solution: {solution}\nNow solve it."])
@pytest.mark.parametrize("student_thinking, teacher_thinking", [(False, True), (True, False), (False, False), (True, True)])
def test_the_teacher_scores_exactly_the_student_completion_tokens(opsd_dirs, template, student_thinking, teacher_thinking):
    """Token ids, position ids and the first completion token's log-prob, against unpadded single-row forwards."""
    data = _data_module(
        opsd_dirs, PromptFormat(template, chat_template_kwargs={"enable_thinking": teacher_thinking}), student_thinking
    )
    data.setup("fit")
    completions = [[40, 41, 42, 1], [50, 51], [60, 61, 62, 63, 64, 65]]  # ragged: one ends with EOS
    rollouts = [
        Rollout(data.train_prompt_ids[i], c, i, 1.0, teacher_prompt_ids=data.train_teacher_prompt_ids[i])
        for i, c in enumerate(completions)
    ]
    assert len({len(r.prompt_ids) for r in rollouts} | {len(r.teacher_prompt_ids) for r in rollouts}) == 6
    batch = data._collate(rollouts)
    teacher_ids, teacher_mask, teacher_width = batch.teacher_inputs()
    assert teacher_width != batch.prompt_length  # the two prompts are laid out at different widths
    positions = position_ids(teacher_mask)
    for i, r in enumerate(rollouts):
        n = len(r.completion_ids)
        assert teacher_ids[i, teacher_width : teacher_width + n].tolist() == r.completion_ids
        assert batch.input_ids[i, batch.prompt_length : batch.prompt_length + n].tolist() == r.completion_ids
        assert teacher_ids[i, teacher_width - len(r.teacher_prompt_ids) : teacher_width].tolist() == r.teacher_prompt_ids
        assert positions[i, teacher_width].item() == len(r.teacher_prompt_ids)  # first completion token
    teacher = tiny_qwen3(5, len(data.tokenizer))
    with torch.no_grad():
        hidden = completion_hidden_states(teacher, *batch.teacher_inputs())  # (B, T, H)
        logprobs = teacher.get_output_embeddings()(hidden).log_softmax(-1)  # (B, T, V)
        for i, r in enumerate(rollouts):
            ids = torch.tensor([r.teacher_prompt_ids + r.completion_ids])
            alone = teacher(ids).logits[0].log_softmax(-1)[len(r.teacher_prompt_ids) - 1 : -1]  # (T_i, V)
            assert_close(logprobs[i, : len(r.completion_ids)], alone, atol=1e-5, rtol=1e-5)
            first = r.completion_ids[0]
            assert_close(logprobs[i, 0, first], alone[0, first])  # predicted from the last privileged-prompt token


def _fit(module, data, tmp_path, steps=2):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        reload_dataloaders_every_n_epochs=1, enable_model_summary=False,
    )
    trainer.fit(module, data)
    return trainer


def _teacher_logprobs_by_hand(base, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = completion_hidden_states(base, *batch.teacher_inputs())
        logprobs = base.get_output_embeddings()(hidden).log_softmax(-1)  # (B, T, V)
    return logprobs.gather(2, batch.completion_ids[..., None])[..., 0] * batch.completion_mask


@pytest.mark.parametrize("lora", [True, False], ids=["lora-adapter-off", "full-frozen-copy"])
def test_opsd_without_a_teacher_is_taught_by_the_student_base_weights(opsd_dirs, tmp_path, lora):
    student = str(opsd_dirs["student"])
    module = DistillationModule(
        student, student_lora=LoRA(r=4, alpha=8) if lora else None,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
    )
    data = _data_module(opsd_dirs)
    _fit(module, data, tmp_path)
    batch = data._collate(data._round)
    scores = module.score(batch)
    base = load_model(student)  # the weights before training
    assert_close(scores.teacher_logprobs, _teacher_logprobs_by_hand(base, batch), atol=1e-5, rtol=1e-5)
    moved = (scores.student_logprobs - _teacher_logprobs_by_hand(base, batch)).abs().max()
    assert moved > 1e-3  # the student trained away from its base weights; the teacher did not follow
    if lora:
        assert not module._frozen  # no second copy of the weights
    else:
        assert not any(p.requires_grad for p in module.teacher.parameters())


def test_opsd_lora_fit_trains_only_the_adapter(opsd_dirs, tmp_path):
    module = DistillationModule(str(opsd_dirs["student"]), student_lora=LoRA(r=4, alpha=8))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    _fit(module, _data_module(opsd_dirs), tmp_path)
    changed = {k for k, v in module.student.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)


def test_opd_without_a_teacher_or_solutions_is_refused(model_dirs, prompt_file, tmp_path):
    module = DistillationModule(str(model_dirs["student"]))
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(model_dirs["student"]), prompts_per_epoch=2, batch_size=2,
                              sampling=SamplingConfig(n=1, max_new_tokens=3))
    with pytest.raises(ConfigError, match="set model.teacher .* or set data.solution_field for OPSD"):
        _fit(module, data, tmp_path, steps=1)


def test_bad_opsd_data_is_refused_in_one_line(opsd_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher_prompt_format.template must contain \{solution\}"):
        _data_module(opsd_dirs, PromptFormat("{problem} only"))
    empty = tmp_path / "empty_solution.jsonl"
    empty.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "solution": " "}) + "\n")
    data = OnPolicyDataModule(str(empty), tokenizer=str(opsd_dirs["student"]), solution_field="solution")
    with pytest.raises(ConfigError, match="line 1 of .* has no reference solution in column 'solution'"):
        data.setup("fit")
    data = OnPolicyDataModule(str(opsd_dirs["data"]), tokenizer=str(opsd_dirs["student"]), solution_field="worked")
    with pytest.raises(ConfigError, match="no column 'worked' \\(data.solution_field\\)"):
        data.setup("fit")

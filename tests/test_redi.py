"""REDI (offline): the SFT and REDI objectives, the trace data module, the trace builder, configs, a real fit."""

from __future__ import annotations

import ast
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
import yaml
from torch.testing import assert_close

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import make_tokenizer
from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import is_correct
from renio_pl.losses import REDILoss, SFTLoss, length_normalized_logprobs
from renio_pl.models import load_model, load_tokenizer
from renio_pl.module import DistillationModule
from renio_pl.offline import OfflineDistillationModule, Trace, TraceDataModule
from renio_pl.offline.cli import main as redi_main
from renio_pl.offline.datamodule import collate_traces
from renio_pl.offline.traces import build_traces
from renio_pl.offline.traces import main as traces_main
from renio_pl.prompt_format import PromptFormat, render_prompt
from renio_pl.rollouts import HFGenerator, SamplingConfig
from renio_pl.sampling import stream_key
from tests.conftest import TEST_CHAT_TEMPLATE, tiny_qwen3

ROOT = Path(__file__).resolve().parents[1]
EOS = 1  # the test tokenizers' <eos>


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def trace_files(tmp_path) -> dict[str, Path]:
    """What `renio-pl-redi-traces` writes, in small: three SFT positives (two for one problem), two triplets."""
    sft = [
        {"prompt": "What is 1+2?", "positive": "3", "problem_index": 0, "sample_index": 0},
        {"prompt": "What is 1+2?", "positive": "It is 3<eos>", "problem_index": 0, "sample_index": 2},
        {"prompt": "2+2?", "positive": "4", "problem_index": 1, "sample_index": 1},
    ]
    redi = [
        {"prompt": "What is 1+2?", "positive": "3", "negative": "", "problem_index": 0},  # empty: EOS alone
        {"prompt": "2+2?", "positive": "4", "negative": "22", "problem_index": 1},
    ]
    return {"sft": write_jsonl(tmp_path / "sft.jsonl", sft), "redi": write_jsonl(tmp_path / "redi.jsonl", redi)}


# --- the objectives, by hand -----------------------------------------------------------------
def test_sft_loss_is_the_token_mean_over_the_batch():
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 9.0, 9.0]])  # 9.0: padding, must not count
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # -((-1) + (-2) + (-3)) / 3 tokens = 2.0 (a mean of per-row means would give (1.5 + 3) / 2 = 2.25)
    assert_close(SFTLoss()(logprobs, mask), torch.tensor(2.0))


def test_redi_loss_by_hand():
    positive = torch.tensor([[-1.0, -2.0], [-3.0, 9.0]])
    positive_mask = torch.tensor([[True, True], [True, False]])
    negative = torch.tensor([[-2.0, -4.0, 9.0], [-1.0, 9.0, 9.0]])
    negative_mask = torch.tensor([[True, True, False], [True, False, False]])
    # per-completion means: positives -1.5, -3; negatives -3, -1
    # pair 1: 1.5 + 0.5 * (-3) = 0.0; pair 2: 3 + 0.5 * (-1) = 2.5; batch mean 1.25
    assert_close(REDILoss(alpha=0.5)(positive, positive_mask, negative, negative_mask), torch.tensor(1.25))
    # alpha 0.8: pair 1: 1.5 - 2.4 = -0.9; pair 2: 3 - 0.8 = 2.2; mean 0.65
    assert_close(REDILoss()(positive, positive_mask, negative, negative_mask), torch.tensor(0.65))
    assert REDILoss().alpha == 0.8


def test_an_empty_completion_counts_as_length_one():
    logprobs, mask = torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)
    assert_close(length_normalized_logprobs(logprobs, mask), torch.tensor([0.0]))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_redi_alpha_outside_0_1_is_refused(alpha):
    with pytest.raises(ConfigError, match=r"model.objective.init_args.alpha must be in \[0, 1\]"):
        REDILoss(alpha=alpha)


def test_redi_loss_without_negatives_is_refused():
    with pytest.raises(ValueError, match="needs a negative completion"):
        REDILoss()(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))


# --- the module's chunked scoring against a plain full-logits reference ------------------------
TRACES = [  # prompt, positive, negative token ids (1 is EOS); lengths differ so that padding shows
    Trace(0, [5, 6, 7, 8], [9, 10, 11, EOS], [12, EOS]),
    Trace(1, [5, 13], [14, EOS], [15, 16, 17, 18, 19, EOS]),
    Trace(2, [20, 21, 22], [23, 24, EOS], [25, 26, EOS]),
]


def reference_sequence_logprob(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed log-prob of `completion` after `prompt`: one unpadded sequence, full logits, plain log_softmax."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None]).sum()


@pytest.mark.parametrize(
    "objective, chunk_tokens, gradient_checkpointing",
    [(SFTLoss(), 3, False), (REDILoss(0.8), 2, True), (REDILoss(0.3), 4096, False)],
    ids=["sft-chunk3", "redi-chunk2-checkpointed", "redi-one-chunk"],
)
def test_loss_and_gradients_match_a_full_logits_reference(model_dirs, objective, chunk_tokens, gradient_checkpointing):
    student = str(model_dirs["student"])
    module = OfflineDistillationModule(
        student, objective=objective, chunk_tokens=chunk_tokens, gradient_checkpointing=gradient_checkpointing
    )
    traces = TRACES if objective.needs_negatives else [Trace(t.index, t.prompt_ids, t.positive_ids) for t in TRACES]
    batch = collate_traces(traces, pad_token_id=0)
    logprobs = module.completion_logprobs(batch.completions)  # (R, T)
    positive, negative = batch.split(logprobs)
    positive_mask, negative_mask = batch.split(batch.completions.completion_mask)
    loss = module.objective(positive, positive_mask, negative, negative_mask)
    loss.backward()

    reference = load_model(student).eval()
    positive_sums = [reference_sequence_logprob(reference, t.prompt_ids, t.positive_ids) for t in TRACES]
    if objective.needs_negatives:  # mean over pairs of -log pi(y_w)/|y_w| + alpha log pi(y_l)/|y_l|
        negative_sums = [reference_sequence_logprob(reference, t.prompt_ids, t.negative_ids) for t in TRACES]
        expected = sum(
            -w / len(t.positive_ids) + objective.alpha * l / len(t.negative_ids)
            for t, w, l in zip(TRACES, positive_sums, negative_sums)
        ) / len(TRACES)
    else:  # -(sum of every positive token's log-prob) / (number of positive tokens)
        expected = -sum(positive_sums) / sum(len(t.positive_ids) for t in TRACES)
    expected.backward()

    assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    got = dict(module.student.named_parameters())
    for name, parameter in reference.named_parameters():
        assert_close(got[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- the data module ---------------------------------------------------------------------------
def test_stage_sft_serves_every_positive_and_stage_redi_serves_triplets(model_dirs, trace_files):
    student = str(model_dirs["student"])
    tokenizer = load_tokenizer(student)
    prompt_format = PromptFormat(template="Q: {problem}")
    sft = TraceDataModule(str(trace_files["sft"]), tokenizer=student, prompt_format=prompt_format, batch_size=3)
    sft.setup("fit")
    assert len(sft.traces) == 3 and all(t.negative_ids is None for t in sft.traces)
    first = render_prompt(tokenizer, "What is 1+2?", prompt_format)
    assert sft.traces[0].prompt_ids == sft.traces[1].prompt_ids == first  # two positives of one problem
    assert sft.traces[2].prompt_ids == render_prompt(tokenizer, "2+2?", prompt_format)
    assert sft.traces[0].positive_ids == tokenizer("3", add_special_tokens=False)["input_ids"] + [EOS]
    assert sft.traces[1].positive_ids == tokenizer("It is 3", add_special_tokens=False)["input_ids"] + [EOS]  # not twice

    redi = TraceDataModule(str(trace_files["redi"]), tokenizer=student, stage="redi", prompt_format=prompt_format)
    redi.setup("fit")
    assert [(t.index, len(t.positive_ids), len(t.negative_ids)) for t in redi.traces] == [(0, 2, 1), (1, 2, 3)]
    assert redi.traces[0].negative_ids == [EOS]

    batch = collate_traces(redi.traces, pad_token_id=0)
    assert batch.pairs == 2 and batch.completions.input_ids.shape[0] == 4  # positives, then negatives
    positive_mask, negative_mask = batch.split(batch.completions.completion_mask)
    assert positive_mask.sum(dim=1).tolist() == [2, 2] and negative_mask.sum(dim=1).tolist() == [1, 3]
    sft_batch = collate_traces(sft.traces, pad_token_id=0)
    assert sft_batch.pairs == 3 and sft_batch.split(sft_batch.completions.completion_mask)[1] is None


def test_the_stage_sft_reads_the_positives_of_a_redi_file(model_dirs, trace_files):
    data = TraceDataModule(str(trace_files["redi"]), tokenizer=str(model_dirs["student"]), stage="sft")
    data.setup("fit")
    assert len(data.traces) == 2 and data.traces[0].negative_ids is None


@pytest.mark.parametrize(
    "limits, message",
    [
        # "It is 3" is 7 characters (one token each), then EOS
        ({"max_completion_tokens": 4}, "record 1 has a 8-token positive completion (EOS included), over "
                                        "data.max_completion_tokens=4; shorten it, raise the limit, or set data.long_traces=drop"),
        # "u:What is 1+2?\na:" (the test chat template around the problem): 2 + 12 + 1 + 2 characters, one token each
        ({"max_prompt_tokens": 10}, "record 0 has a 17-token prompt, over data.max_prompt_tokens=10"),
    ],
)
def test_long_traces_error_in_one_line_or_are_dropped_and_counted(model_dirs, trace_files, limits, message):
    student = str(model_dirs["student"])
    strict = TraceDataModule(str(trace_files["sft"]), tokenizer=student, **limits)
    with pytest.raises(ConfigError) as error:
        strict.setup("fit")
    assert message in str(error.value) and "\n" not in str(error.value)
    lenient = TraceDataModule(str(trace_files["sft"]), tokenizer=student, long_traces="drop", **limits)
    lenient.setup("fit")
    kept = {"max_completion_tokens": [0, 2], "max_prompt_tokens": [2]}[next(iter(limits))]
    assert [t.index for t in lenient.traces] == kept and lenient.dropped_traces == 3 - len(kept)


@pytest.mark.parametrize(
    "records, stage, message",
    [
        ([{"prompt": "1+2", "positive": "3"}], "redi", "has no column 'negative' (data.negative_field)"),
        ([{"prompt": "1+2", "positive": "3", "negative": None}], "redi", "record 0 of"),
        ([{"prompt": "1+2", "positive": None}], "sft", "has no positive trace in column 'positive' (data.positive_field)"),
        ([{"question": "1+2", "positive": "3"}], "sft", "has no column 'prompt' (data.prompt_field)"),
    ],
)
def test_bad_trace_records_are_one_line_errors(model_dirs, tmp_path, records, stage, message):
    path = write_jsonl(tmp_path / "traces.jsonl", records)
    data = TraceDataModule(str(path), tokenizer=str(model_dirs["student"]), stage=stage)
    with pytest.raises(ConfigError) as error:
        data.setup("fit")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_data_arguments_fail_before_anything_loads(model_dirs):
    student = str(model_dirs["student"])
    with pytest.raises(ConfigError, match="data.stage must be sft or redi; got 'dpo'"):
        TraceDataModule("x.jsonl", tokenizer=student, stage="dpo")
    with pytest.raises(ConfigError, match="data.max_completion_tokens must be >= 1"):
        TraceDataModule("x.jsonl", tokenizer=student, max_completion_tokens=0)
    with pytest.raises(ConfigError, match="data.train_path: file missing.jsonl does not exist"):
        TraceDataModule("missing.jsonl", tokenizer=student).setup("fit")
    with pytest.raises(ConfigError, match="fit needs traces: set data.train_path"):
        TraceDataModule(None, tokenizer=student).setup("fit")


# --- combinations that make no sense ------------------------------------------------------------
def fit_until_error(model, data, tmp_path) -> str:
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError) as error:
        trainer.fit(model, data)
    return str(error.value)


def test_redi_objective_on_sft_records_and_sft_objective_on_triplets_are_refused(model_dirs, trace_files, tmp_path):
    student = str(model_dirs["student"])
    message = fit_until_error(
        OfflineDistillationModule(student, objective=REDILoss()), TraceDataModule(str(trace_files["sft"]), student), tmp_path
    )
    assert message.startswith("model.objective REDILoss needs a negative trace for every positive, but data.stage is 'sft'")
    assert "build TraceDataModule with stage='redi'" in message
    message = fit_until_error(
        OfflineDistillationModule(student, objective=SFTLoss()),
        TraceDataModule(str(trace_files["redi"]), student, stage="redi"), tmp_path,
    )
    assert message.startswith("model.objective SFTLoss trains on positive traces alone, but data.stage is 'redi'")
    assert "build TraceDataModule with stage='sft'" in message


def test_on_policy_and_offline_halves_do_not_mix(model_dirs, trace_files, prompt_file, tmp_path):
    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    message = fit_until_error(DistillationModule(student, teacher), TraceDataModule(str(trace_files["sft"]), student), tmp_path)
    assert "TraceDataModule serves offline traces, which DistillationModule does not train on" in message
    message = fit_until_error(OfflineDistillationModule(student), OnPolicyDataModule(str(prompt_file), student), tmp_path)
    assert "OfflineDistillationModule trains on teacher traces, not on OnPolicyDataModule" in message


def offline_imports(name: str) -> set[str]:
    """The `renio_pl.offline` modules that `renio_pl/offline/<name>.py` imports, anywhere in the file."""
    tree = ast.parse((ROOT / "renio_pl" / "offline" / f"{name}.py").read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return {n.removeprefix("renio_pl.offline.") for n in names if n.startswith("renio_pl.offline.")}


def test_the_offline_modules_import_one_way():
    """cli -> module -> datamodule, never back: the data module checks the model by its objective alone."""
    assert offline_imports("datamodule") == set()
    assert offline_imports("module") == {"datamodule"}
    assert offline_imports("cli") == {"datamodule", "module"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.teacher", "{teacher}"], "takes no teacher model, weighter or token loss"),
        (["--model.weighter", "ReNIOWeighter"], "takes no teacher model, weighter or token loss"),
        (["--data.sampling.n", "4"], "takes no teacher model, weighter or token loss"),
        (["--model.objective", "renio_pl.losses.ForwardKL"], "option --model.objective"),
        (["--model.objective", "REDILoss", "--model.objective.alpha", "2"], "alpha must be in [0, 1]"),
        (["--data.stage", "redi"], "data.stage is set from model.objective (SFTLoss: sft, REDILoss: redi); remove"),
        (["--data.stage=dpo"], "data.stage is set from model.objective"),
        (["--config", "{stage_config}"], "data.stage is set from model.objective (SFTLoss: sft, REDILoss: redi); remove"),
        # the link makes the stage redi, so the sft file's missing negatives are what is refused
        (["--model.objective", "REDILoss"], "has no column 'negative' (data.negative_field)"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(model_dirs, trace_files, tmp_path, capsys, extra, message):
    args = ["fit", "--model.student", str(model_dirs["student"]), "--data.train_path", str(trace_files["sft"]),
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    stage_config = tmp_path / "stage.yaml"  # a config written before the stage followed the objective
    stage_config.write_text(yaml.safe_dump({"data": {"stage": "sft"}}))
    with pytest.raises(SystemExit) as exit_info:
        redi_main(args + [a.format(teacher=model_dirs["teacher"], stage_config=stage_config) for a in extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


# --- the trace builder on a tiny real model, graded by the real math verifier --------------------
@pytest.fixture(scope="module")
def digit_teacher(tmp_path_factory) -> Path:
    """A random tiny Qwen3 over `<pad> <eos> <unk> 7 8`: its samples are `7`, `8`, `78`, ... or empty, often correct."""
    folder = tmp_path_factory.mktemp("digit_teacher")
    tokenizer = make_tokenizer("78", TEST_CHAT_TEMPLATE)
    tiny_qwen3(3, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_trace_builder_grades_keeps_first_pair_and_records_provenance(digit_teacher, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"question": f"problem {i}", "final": "7" if i % 2 else "8"} for i in range(8)
    ] + [{"question": "no answer", "final": None}])
    sampling = SamplingConfig(n=8, temperature=1.0, max_new_tokens=3)
    summary = build_traces(
        str(digit_teacher), str(prompts), str(tmp_path / "out"), prompt_field="question", answer_field="final",
        engine=HFGenerator(batch_size=4), sampling=sampling, seed=5,
    )
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    redi = [json.loads(line) for line in (tmp_path / "out" / "redi.jsonl").read_text().splitlines()]
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 9 and summary["without_answer"] == 1 and summary["samples"] == 64
    assert summary["positives"] + summary["negatives"] + summary["unfinished"] == 64
    assert summary["sft_records"] == summary["positives"] == len(sft) > 0
    assert summary["redi_records"] == len(redi) > 0
    assert summary["redi_records"] + summary["skipped_no_positive"] + summary["skipped_no_negative"] == 8
    for record in sft:
        assert is_correct(record["positive"], record["answer"])
    for record in redi:
        assert is_correct(record["positive"], record["answer"]) and not is_correct(record["negative"], record["answer"])
        assert record["positive_index"] == min(r["sample_index"] for r in sft if r["problem_index"] == record["problem_index"])
    provenance = {"teacher": str(digit_teacher), "engine": "renio_pl.rollouts.HFGenerator", "seed": 5,
                  "sampling": {"n": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3},
                  "verifier": "renio_pl.evaluators.math.is_correct",
                  "prompt_format": {"template": "{problem}", "system": None, "chat_template_kwargs": {}}}
    assert all(record.items() >= provenance.items() for record in sft + redi)

    # each positive is the engine's own sample j of problem i, drawn from the stream keyed by (seed, i)
    tokenizer, teacher = load_tokenizer(str(digit_teacher)), load_model(str(digit_teacher))
    record = sft[0]
    prompt = render_prompt(tokenizer, record["prompt"], PromptFormat())
    [samples] = HFGenerator().generate(teacher, tokenizer, [prompt], sampling, [stream_key(5, record["problem_index"])])
    assert tokenizer.decode(samples[record["sample_index"]], skip_special_tokens=True) == record["positive"]


def test_trace_builder_command_reads_a_config_and_reports_bad_input_in_one_line(digit_teacher, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"p{i}", "answer": "7"} for i in range(3)])
    config = tmp_path / "traces.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": str(digit_teacher), "prompts": str(prompts), "output": str(tmp_path / "out"),
        "sampling": {"n": 4, "max_new_tokens": 2}, "verifier": "renio_pl.evaluators.math.is_correct",
    }))
    traces_main(["--config", str(config)])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["samples"] == 12
    with pytest.raises(SystemExit) as exit_info:
        traces_main(["--config", str(config), "--prompts", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines()[-1].startswith("error: prompts: file") and "Traceback" not in err


# --- shipped configs -----------------------------------------------------------------------------
REDI_CONFIGS = {
    "sft": ROOT / "configs" / "paper" / "redi_qwen2.5_math_1.5b_sft.yaml",
    "redi": ROOT / "configs" / "paper" / "redi_qwen2.5_math_1.5b_redi.yaml",
}


def printed_config(config: Path, capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        redi_main(["fit", "--config", str(config), *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_demo_traces_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        traces_main(["--config", str(ROOT / "configs" / "demo_redi_traces.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["teacher"] == "demo_assets/teacher" and printed["verifier"] == "renio_pl.evaluators.math.is_correct"
    demo_sft = yaml.safe_load((ROOT / "configs" / "demo_redi_sft.yaml").read_text())
    demo_redi = yaml.safe_load((ROOT / "configs" / "demo_redi.yaml").read_text())
    assert demo_sft["data"]["train_path"] == f"{printed['output']}/sft.jsonl"  # the three steps chain
    assert demo_redi["data"]["train_path"] == f"{printed['output']}/redi.jsonl"
    assert demo_redi["model"]["student"] == demo_sft["trainer"]["callbacks"][-1]["init_args"]["folder"]


@pytest.mark.parametrize("stage", REDI_CONFIGS)
def test_paper_redi_configs_carry_the_authors_recipe(stage, capsys):
    printed = printed_config(REDI_CONFIGS[stage], capsys)
    trainer, model, data = printed["trainer"], printed["model"], printed["data"]
    lr, batch, epochs = {"sft": (5e-5, 128, 5), "redi": (1e-6, 32, 1)}[stage]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == lr and model["optimizer"]["init_args"]["weight_decay"] == 1e-4
    assert data["batch_size"] * trainer["devices"] * trainer["accumulate_grad_batches"] == batch
    assert trainer["max_epochs"] == epochs and trainer["precision"] == "bf16-mixed" and model["dtype"] == "float32"
    schedule = model["lr_scheduler"]["init_args"]
    assert model["lr_scheduler"]["class_path"] == "renio_pl.schedules.WarmupDecay"  # the HF Trainer's linear schedule
    assert (schedule["shape"], schedule["min_ratio"]) == ("linear", 0.0)
    assert schedule["total_steps"] == trainer["max_steps"]
    assert schedule["warmup_steps"] == math.ceil(0.1 * trainer["max_steps"])  # warmup_ratio 0.1, as the HF Trainer rounds it
    assert (data["max_prompt_tokens"], data["max_completion_tokens"], data["long_traces"]) == (800, 19000, "drop")
    assert "stage" not in data and model["gradient_checkpointing"] is True  # the objective sets it (instantiated below)
    objective = model["objective"]
    if stage == "sft":
        assert objective["class_path"] == "renio_pl.losses.SFTLoss"
        assert model["student"] != "Qwen/Qwen2.5-Math-1.5B"  # the authors' 32k-context copy, see the config
    else:
        assert objective == {"class_path": "renio_pl.losses.REDILoss", "init_args": {"alpha": 0.8}}
        sft = printed_config(REDI_CONFIGS["sft"], capsys)
        saved = [c for c in sft["trainer"]["callbacks"] if c["class_path"] == "renio_pl.offline.SaveStudent"]
        assert model["student"] == saved[0]["init_args"]["folder"]  # stage 2 starts from the SFT student


@pytest.mark.parametrize("stage", REDI_CONFIGS)
def test_paper_redi_configs_instantiate_offline(stage, model_dirs, trace_files, tmp_path):
    """Every class of the config is built (a tiny student stands in for the 1.5B one; CPU, one device)."""
    from renio_pl.offline.cli import OfflineArgumentParser, OfflineCLI

    cli = OfflineCLI(
        OfflineDistillationModule, TraceDataModule, parser_class=OfflineArgumentParser, run=False,
        save_config_kwargs={"overwrite": True},
        args=["--config", str(REDI_CONFIGS[stage]), "--model.student", str(model_dirs["student"]),
              "--data.train_path", str(trace_files[stage]), "--data.val_path", "null",
              "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
    )
    assert cli.datamodule.stage == stage and cli.datamodule.max_completion_tokens == 19000
    assert type(cli.model.objective).__name__ == {"sft": "SFTLoss", "redi": "REDILoss"}[stage]
    optimizer = cli.model.configure_optimizers()
    assert optimizer["optimizer"].defaults["weight_decay"] == 1e-4


# --- a real fit: SFT, then REDI from the saved SFT student ----------------------------------------
def test_sft_then_redi_fit_from_the_saved_student(model_dirs, trace_files, prompt_file, tmp_path):
    common = ["--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--data.batch_size", "2",
              "--data.val_path", str(prompt_file), "--data.val_sampling.max_new_tokens", "3",
              "--model.optimizer.lr", "1e-2", "--data.max_prompt_tokens", "64", "--data.max_completion_tokens", "16",
              "--trainer.val_check_interval", "1.0"]
    sft_dir, redi_dir = tmp_path / "sft", tmp_path / "redi"
    redi_main(["fit", "--config", str(ROOT / "configs" / "demo_redi_sft.yaml"), "--model.student", str(model_dirs["student"]),
               "--data.train_path", str(trace_files["sft"]), "--trainer.default_root_dir", str(sft_dir),
               "--trainer.logger.init_args.save_dir", str(sft_dir), "--trainer.callbacks.folder", str(sft_dir / "student"),
               "--model.lr_scheduler", "null", *common])
    initial = load_model(str(model_dirs["student"])).state_dict()
    sft_student = load_model(str(sft_dir / "student")).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in sft_student.items())  # trained, and saved loadable
    assert load_tokenizer(str(sft_dir / "student")).get_vocab() == load_tokenizer(str(model_dirs["student"])).get_vocab()
    restored = OfflineDistillationModule.load_from_checkpoint(sft_dir / "version_0" / "checkpoints" / "last.ckpt")
    for name, tensor in restored.student.state_dict().items():  # the hparams rebuild this class; same weights
        assert torch.equal(tensor, sft_student[name]), name

    redi_main(["fit", "--config", str(ROOT / "configs" / "demo_redi.yaml"), "--model.student", str(sft_dir / "student"),
               "--data.train_path", str(trace_files["redi"]), "--trainer.default_root_dir", str(redi_dir),
               "--trainer.logger.init_args.save_dir", str(redi_dir), "--trainer.callbacks.folder", str(redi_dir / "student"),
               "--model.lr_scheduler", "null", *common])
    redi_student = load_model(str(redi_dir / "student")).state_dict()
    assert any(not torch.equal(sft_student[k], v) for k, v in redi_student.items())
    for folder, keys in ((sft_dir, {"train/positive_logprob"}), (redi_dir, {"train/negative_logprob", "traces/negative_len"})):
        rows = list(csv.DictReader((folder / "version_0" / "metrics.csv").read_text().splitlines()))
        logged = {k for row in rows for k, v in row.items() if v}
        assert {"train/loss", "val/accuracy", "data/traces", "data/dropped_traces"} | keys <= logged
        assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows if r["train/loss"])
        assert rows[0]["step"] == "0" and list((folder / "version_0" / "checkpoints").glob("*.ckpt"))


def test_save_student_merges_a_lora_adapter(model_dirs, tmp_path):
    from types import SimpleNamespace

    from renio_pl.models import LoRA
    from renio_pl.offline import SaveStudent

    module = OfflineDistillationModule(str(model_dirs["student"]), student_lora=LoRA(r=4, alpha=8))
    with torch.no_grad():  # B starts at zero: give the adapter an effect
        for name, parameter in module.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    SaveStudent(str(tmp_path / "merged")).on_fit_end(SimpleNamespace(is_global_zero=True), module)
    saved = load_model(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert_close(saved(input_ids=ids).logits, module.student.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_console_scripts_point_at_the_redi_commands():
    from importlib import import_module

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, function in (("renio-pl-redi", redi_main), ("renio-pl-redi-traces", traces_main)):
        module, _, attribute = scripts[name].partition(":")
        assert getattr(import_module(module), attribute) is function


# --- the demo, as a user runs it -------------------------------------------------------------------
@pytest.mark.slow
def test_demo_redi_learns(tmp_path):
    """Fresh folder: demo assets, traces, SFT, REDI (real processes); held-out accuracy rises over both stages."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = [
        [sys.executable, "-m", "renio_pl.demo.run", "--assets-only"],
        [sys.executable, "-m", "renio_pl.offline.traces", "--config", str(ROOT / "configs" / "demo_redi_traces.yaml")],
        [sys.executable, "-m", "renio_pl.offline.cli", "fit", "--config", str(ROOT / "configs" / "demo_redi_sft.yaml")],
        [sys.executable, "-m", "renio_pl.offline.cli", "fit", "--config", str(ROOT / "configs" / "demo_redi.yaml")],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    def accuracy(run: str) -> list[float]:
        rows = csv.DictReader((tmp_path / "runs" / run / "version_0" / "metrics.csv").read_text().splitlines())
        return [float(r["val/accuracy"]) for r in rows if r["val/accuracy"]]

    sft, redi = accuracy("demo_redi_sft"), accuracy("demo_redi")
    assert sft[-1] > sft[0] + 0.3, sft  # measured: 0.576 before, 0.962 after SFT
    assert redi[0] == pytest.approx(sft[-1], abs=1e-6)  # stage 2 starts from the saved SFT student
    assert redi[-1] > redi[0] - 0.02, redi  # measured: 0.966; REDI's own gain here is within noise

"""`renio-pl`: the vLLM demo overlay; bad input gives one line and exit 2; a real fit runs (tests/test_configs.py parses every config)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from renio_pl.cli import main
from tests.conftest import tiny_qwen3, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def printed_config(subcommand: str, config: Path, capsys) -> dict:
    """The full config `renio-pl <subcommand> --config <config> --print_config` prints (it must exit 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_vllm_demo_overlay_changes_only_the_engine_and_run_folder(capsys):
    printed = printed_config("fit", ROOT / "configs" / "demo.yaml", capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "demo_vllm.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    overlaid = yaml.safe_load(capsys.readouterr().out)
    assert overlaid["data"]["engine"]["class_path"] == "renio_pl.vllm_engine.VLLMGenerator"
    assert overlaid["trainer"]["default_root_dir"] == "runs/demo_vllm"
    for section in ("model", "data", "trainer"):
        for key in printed[section]:
            if key not in ("engine", "default_root_dir", "logger"):
                assert overlaid[section][key] == printed[section][key], (section, key)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.fixture()
def fit_args(model_dirs, prompt_file):
    return ["fit", "--model.student", str(model_dirs["student"]), "--model.teacher", str(model_dirs["teacher"]),
            "--data.train_path", str(prompt_file), "--trainer.max_steps", "1", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.weighter", "NoSuchWeighter"], "option --model.weighter"),
        (["--model.weighter", "ReNIOWeighter", "--model.weighter.normalization", "mean"], "--model.weighter"),
        (["--model.weighter", "ReNIOWeighter", "--model.weighter.clip", "abc"], "--model.weighter"),
        (["--model.weighter", "ReNIOWeighter", "--model.weighter.cap", "0.5"], "cap must be >= 1"),
        (["--data.batch_size", "many"], "option --data.batch_size"),
        (["--model.teacher", "./no/such/folder"], "model.teacher: model folder ./no/such/folder does not exist"),
        (["--model.teacher", "nobody/no-such-model"], "HF_HUB_OFFLINE=1 is set"),
        (["--data.train_path", "missing.jsonl"], "data.train_path: file missing.jsonl does not exist"),
        (["--data.prompt_field", "question"], "has no column 'question' (data.prompt_field)"),
        (["--data.answer_field", "solution"], "has no column 'solution' (data.answer_field)"),
        (["--model.weighter", "OracleWeighter", "--data.answer_field", "null"], "OracleWeighter needs correctness labels"),
        (["--data.max_prompt_tokens", "3"], "over data.max_prompt_tokens=3"),
        (["--model.loss", "renio_pl.losses.GeneralizedJSD", "--model.loss.beta", "2"], "beta must be in [0, 1]"),
        (["--data.sampling.top_p", "0"], "top_p must be in (0, 1]"),
        (["--trainer.max_epochs", "three"], "option --trainer.max_epochs"),
        (["--model.teacher", "{wide_teacher}"], "output vocabulary has"),
        (["--model.teacher", "null"], "fit needs a teacher: set model.teacher"),
        (["--data.train_path", "null"], "fit needs training prompts: set data.train_path"),
        (["--data.train_path", "{empty_file}"], "is empty (0 bytes)"),
        (["--data.sampling.max_new_tokens", "2048"], "leaves no room for a prompt in the student's context of 2048"),
        (["--data.sampling.max_new_tokens", "2040"], "over the student's context (2048 tokens) minus data.sampling"),
        (["--data.engine.batch_size", "0"], "batch_size must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(fit_args, extra, message, capsys, tmp_path, model_dirs):
    wide_teacher = tmp_path / "wide"  # same tokenizer, 8 more output rows
    if "{wide_teacher}" in extra:
        tiny_qwen3(1, len(tiny_tokenizer()) + 8).save_pretrained(wide_teacher)
        tiny_tokenizer().save_pretrained(wide_teacher)
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("")
    extra = [arg.format(wide_teacher=wide_teacher, empty_file=empty_file) for arg in extra]
    code, err = run_cli(fit_args + extra + ["--trainer.default_root_dir", str(tmp_path)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_a_missing_student_is_named_with_how_to_give_it(capsys):
    code, err = run_cli(["fit"], capsys)
    assert code == 2 and err.splitlines()[-1] == (
        "error: option --model.student is missing: give it as --model.student VALUE or set it in a --config file "
        "(see --help)"
    )


def test_a_model_folder_without_a_tokenizer_is_named(fit_args, model_dirs, tmp_path, capsys):
    """Once blamed on the teacher ("its tokenizer differs"): transformers builds an empty tokenizer from config.json."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dirs["student"] / name).read_bytes())
    student = fit_args.index("--model.student") + 1
    code, err = run_cli([*fit_args[:student], str(bare), *fit_args[student + 1:]], capsys)
    assert code == 2 and err.splitlines()[-1] == (
        f"error: model.student: model folder {bare} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
        "save one there with tokenizer.save_pretrained(folder)"
    )


def test_test_without_benchmarks_is_one_line(model_dirs, capsys):
    code, err = run_cli(["test", "--model.student", str(model_dirs["student"]), "--trainer.accelerator", "cpu"], capsys)
    assert code == 2 and err.splitlines()[-1].startswith("error: test needs benchmarks: set data.test_sets")


def test_malformed_yaml(fit_args, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  student: [unclosed\n")
    code, err = run_cli(["fit", "--config", str(bad)], capsys)
    assert code == 2 and err.startswith("error:") and "Traceback" not in err


def test_real_process_fit_and_error(model_dirs, prompt_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "renio_pl.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
               "--model.student", str(model_dirs["student"]), "--model.teacher", str(model_dirs["teacher"]),
               "--data.train_path", str(prompt_file), "--data.val_path", str(prompt_file),
               "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.prompts_per_epoch", "4"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "version_0" / "training.png").is_file()
    assert list((tmp_path / "version_0" / "checkpoints").glob("*.ckpt"))
    bad = subprocess.run(command + ["--model.weighter", "Nope"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[0].startswith("error: option --model.weighter")


def test_validate_subcommand_reports_held_out_accuracy(model_dirs, prompt_file, tmp_path, capsys):
    main(["validate", "--model.student", str(model_dirs["student"]), "--data.val_path", str(prompt_file),
          "--data.val_sampling.max_new_tokens", "3", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert "val/accuracy" in capsys.readouterr().out

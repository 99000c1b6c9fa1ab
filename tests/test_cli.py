"""`renio-pl`: every shipped config parses; bad input gives one line and exit 2; a real fit runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from renio_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["student"] and printed["data"]["train_path"]


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
        (["--model.weighter", "OracleWeighter", "--data.answer_field", "null"], "OracleWeighter needs correctness labels"),
        (["--data.max_prompt_tokens", "3"], "over data.max_prompt_tokens=3"),
        (["--model.loss", "renio_pl.losses.GeneralizedJSD", "--model.loss.beta", "2"], "beta must be in [0, 1]"),
        (["--data.sampling.top_p", "0"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(fit_args, extra, message, capsys, tmp_path):
    code, err = run_cli(fit_args + extra + ["--trainer.default_root_dir", str(tmp_path)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


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

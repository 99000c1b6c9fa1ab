"""The server teacher's parts that need no server: the tempered copy, the config, the refusals at construction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from renio_pl.cli import main
from renio_pl.errors import ConfigError
from renio_pl.losses import GeneralizedJSD, SampledReverseKL, TopKForwardKL
from renio_pl.module import DistillationModule
from renio_pl.teacher_server import ServerTeacher
from renio_pl.teacher_server_launch import TEMPERATURE_KEY

ROOT = Path(__file__).resolve().parents[1]


def test_temper_command_writes_a_copy_whose_log_probs_are_the_teacher_at_t(model_dirs, tmp_path):
    out = tmp_path / "tempered"
    done = subprocess.run(
        [sys.executable, "-m", "renio_pl.teacher_server", "temper", str(model_dirs["teacher"]), str(out),
         "--temperature", "0.7"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())[TEMPERATURE_KEY] == 0.7
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"], dtype=torch.float32).eval()
    tempered = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        expected = torch.log_softmax(teacher(ids).logits / 0.7, dim=-1)
        served = torch.log_softmax(tempered(ids).logits, dim=-1)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)
    # the input embeddings are the teacher's, untouched
    torch.testing.assert_close(tempered.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    bad = subprocess.run([sys.executable, "-m", "renio_pl.teacher_server", "temper", str(model_dirs["teacher"]),
                          str(tmp_path / "x"), "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == "error: --temperature must be > 0; got 0.0"


def test_the_overlay_changes_only_the_teacher_the_loss_and_the_run_folder(capsys):
    def printed(*configs: str) -> dict:
        arguments = ["fit"] + [part for config in configs for part in ("--config", str(ROOT / "configs" / config))]
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, "--print_config"])
        assert exit_info.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    demo, overlaid = printed("demo.yaml"), printed("demo.yaml", "demo_teacher_server.yaml")
    assert overlaid["model"]["teacher"] is None
    assert overlaid["model"]["teacher_server"]["init_args"]["url"] == "http://127.0.0.1:8000"
    assert overlaid["model"]["loss"]["class_path"] == "renio_pl.losses.TopKForwardKL"
    assert overlaid["trainer"]["default_root_dir"] == "runs/demo_teacher_server"
    for section in ("model", "data", "trainer"):
        for key in demo[section]:
            if key not in ("teacher", "teacher_server", "loss", "default_root_dir", "logger"):
                assert overlaid[section][key] == demo[section][key], (section, key)


def test_refused_at_construction_in_one_line(model_dirs):
    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    server = ServerTeacher("http://127.0.0.1:8000", top_k=5)
    with pytest.raises(ConfigError, match="GeneralizedJSD needs the teacher's full vocabulary"):
        DistillationModule(student, loss=GeneralizedJSD(), teacher_server=server)
    with pytest.raises(ConfigError, match="set model.teacher or model.teacher_server, not both"):
        DistillationModule(student, teacher, loss=SampledReverseKL(), teacher_server=server)
    with pytest.raises(ConfigError, match="top 20 tokens but model.teacher_server.top_k is 5; set it to at least 20"):
        DistillationModule(student, loss=TopKForwardKL(top_k=20), teacher_server=server)
    for bad, message in [
        (dict(url="127.0.0.1:8000"), "must start with http://"),
        (dict(url="http://127.0.0.1:8000", too_long="truncate"), "too_long must be refuse or skip"),
        (dict(url="http://127.0.0.1:8000", served_temperature=0.0), "served_temperature must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ServerTeacher(**bad)


def test_fit_with_no_server_at_the_url_stops_in_one_line(model_dirs, prompt_file, tmp_path):
    from renio_pl.teacher_server_launch import free_port

    url = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable, "-m", "renio_pl.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--config", str(ROOT / "configs" / "demo_teacher_server.yaml"), "--model.teacher_server.url", url,
        "--model.student", str(model_dirs["student"]), "--data.train_path", str(prompt_file),
        "--data.val_path", str(prompt_file), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.prompts_per_epoch", "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: model.teacher_server: no vLLM server answers at {url} ")

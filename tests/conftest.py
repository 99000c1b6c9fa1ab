"""Tiny real architectures and tokenizers, built offline in the test process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import reads it

import json  # noqa: E402
import signal
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from renio_pl.demo.task import make_tokenizer

TEST_CHARACTERS = string.digits + string.ascii_letters + " +-*/=().,?:\n"
# A chat template with visible role markers, so rendering is checked for real.
TEST_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def tiny_tokenizer():
    return make_tokenizer(TEST_CHARACTERS, TEST_CHAT_TEMPLATE)


def tiny_qwen3(seed: int, vocab_size: int, hidden_size: int = 64, layers: int = 2) -> Qwen3ForCausalLM:
    """A 2-layer random-weight Qwen3 (head_dim 32, as vLLM's CPU backend needs)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=hidden_size // 32,
        num_key_value_heads=1, head_dim=32, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


REPO = Path(__file__).resolve().parents[1]


def small_fit(models: dict[str, Path], prompt_file: Path, folder: Path, callbacks: list[dict], *extra: str,
              trainer: dict | None = None, model: dict | None = None, data: dict | None = None,
              timeout: float = 600, launch: Callable[[list[str]], subprocess.CompletedProcess] | None = None
              ) -> subprocess.CompletedProcess:
    """`renio-pl fit` in a subprocess on the tiny models: 3 rounds of 4 prompts x 2 samples, batches of 2.

    ReNIO (threshold 0, ema) and AdamW lr 0.01 with a StepLR; `trainer`, `model` and `data`
    entries override the config's, `callbacks` follow a checkpoint every step (`folder/checkpoints`).
    The run's process group is killed past `timeout` seconds; `launch`, given the module and
    arguments (`renio_pl.cli fit ...`), runs them its own way instead (e.g. under torchrun).
    """
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 3,  # renio-pl's trainer defaults (renio_pl.cli) do the rest
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False, "log_every_n_steps": 1,
            "default_root_dir": str(folder),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(folder / "checkpoints"), "every_n_train_steps": 1, "save_last": True}},
                *callbacks,
            ],
            **(trainer or {}),
        },
        "model": {
            "student": str(models["student"]), "teacher": str(models["teacher"]),
            "weighter": {"class_path": "renio_pl.weighters.ReNIOWeighter",
                         "init_args": {"threshold": 0.0, "normalization": "ema"}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3, "gamma": 0.5}},
            **(model or {}),
        },
        "data": {
            "train_path": str(prompt_file), "prompts_per_epoch": 4, "batch_size": 2, "seed": 0,
            "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 5},
            **(data or {}),
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(json.dumps(config))
    command = ["renio_pl.cli", "fit", "--config", str(folder / "run.yaml"), *extra]
    if launch is not None:
        return launch(command)
    return run_in_own_group([sys.executable, "-m", *command], timeout)


def run_in_own_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command` from the repo in a new session; past `timeout` seconds kill its whole process group
    (the ranks a launcher started too) and raise `subprocess.TimeoutExpired`."""
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def save_model(folder: Path, seed: int, **kwargs) -> Path:
    tokenizer = tiny_tokenizer()
    tiny_qwen3(seed, len(tokenizer), **kwargs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Student and teacher folders written by save_pretrained (two seeds of one architecture)."""
    root = tmp_path_factory.mktemp("models")
    return {"student": save_model(root / "student", 0), "teacher": save_model(root / "teacher", 1)}


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    """Twelve arithmetic problems with answers, as jsonl."""
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    with path.open("w") as f:
        for a in range(12):
            f.write(json.dumps({"prompt": f"What is {a}+{a + 1}?", "answer": str(2 * a + 1)}) + "\n")
    return path

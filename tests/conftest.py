"""Tiny real architectures and tokenizers, built offline in the test process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import reads it

import json  # noqa: E402
import string
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

"""Loading the student and teacher: hub id or local folder, dtype, optional LoRA, checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from renio_pl.errors import ConfigError

__all__ = ["LoRA", "DType", "load_model", "load_tokenizer", "check_same_vocabulary", "policy_weights"]

DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class LoRA:
    """A LoRA adapter on the student (peft); the paper uses rank 64, alpha 128, all projections.

    Attributes:
        r: rank.
        alpha: scaling numerator (`lora_alpha`).
        dropout: dropout on the adapter input.
        target_modules: module names, or `all-linear` for every linear layer but the output head.
    """

    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] | str = field(default="all-linear")


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path)


def _check_source(name_or_path: str, option: str) -> None:
    path = Path(name_or_path).expanduser()
    if _is_local(name_or_path):
        if not path.is_dir():
            raise ConfigError(f"{option}: model folder {name_or_path} does not exist; give a folder written by save_pretrained or a hub id")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option}: {name_or_path} has no config.json; give a folder written by save_pretrained")


def _load_error(name_or_path: str, option: str, error: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "HF_HUB_OFFLINE=1 is set: download the model first or give a local folder" if offline else (
        "check the hub id, your network and access rights, or give a local folder"
    )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"{option}: cannot load {name_or_path!r} ({first}); {hint}")


# Any of these makes a folder's tokenizer (transformers would otherwise build an empty one from config.json).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(name_or_path: str, option: str = "model.student") -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local folder, with a pad token (EOS when it has none)."""
    _check_source(name_or_path, option)
    folder = Path(name_or_path).expanduser()
    if _is_local(name_or_path) and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{option}: model folder {name_or_path} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
            "save one there with tokenizer.save_pretrained(folder)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, option, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str, dtype: DType = "float32", lora: LoRA | None = None, option: str = "model.student"
) -> PreTrainedModel:
    """A causal LM from a hub id or a local folder; wrapped with a LoRA adapter when `lora` is set."""
    _check_source(name_or_path, option)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, option, error) from error
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
        model = get_peft_model(model, config)
    return model


def check_same_vocabulary(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Refuse a teacher whose tokenizer or output vocabulary differs from the student's."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=str)[:3]
        raise ConfigError(
            f"model.teacher: its tokenizer differs from the student's ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens; e.g. {differing}); distillation needs a teacher with the same tokenizer"
        )
    student_v = student.get_output_embeddings().weight.shape[0]
    teacher_v = teacher.get_output_embeddings().weight.shape[0]
    if student_v != teacher_v:
        raise ConfigError(
            f"model.teacher: its output vocabulary has {teacher_v} entries and the student's {student_v}; "
            "full-vocabulary losses need equal sizes (resize one model's embeddings)"
        )


@torch.no_grad()
def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights the model samples with, under the checkpoint's names (`model.layers.0...`).

    A LoRA student (peft) yields its merged weights, `W + scale * B @ A` for each adapted
    layer, computed beside the model: its own weights are never merged and unmerged in place
    (in bf16 that round trip drifts). Adapter tensors themselves are left out.

    Yields:
        (name, tensor) pairs, the tensors detached (merged ones are new, the others shared).
    """
    if not hasattr(model, "get_base_model"):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        name: sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters
    }
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and module_name in deltas:
            tensor = tensor + deltas[module_name].to(tensor.dtype)
        yield name, tensor

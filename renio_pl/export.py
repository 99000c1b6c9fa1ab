"""`renio-pl-export CKPT OUT_DIR [--adapter]`: a fit checkpoint as a Hugging Face model folder.

Works on any checkpoint `renio-pl fit` or `renio-pl-redi fit` wrote (OPD, OPSD, TRD, SFT or
REDI; a full or a LoRA student). OUT_DIR receives the student's weights (a LoRA adapter merged
in), its config and generation config, and the tokenizer with its chat template: a folder that
`transformers`, vLLM and `renio-pl test --model.student OUT_DIR` load like any model. With
`--adapter` a LoRA run is written as a PEFT adapter folder instead (adapter weights and
config, pointing at the base model, plus the tokenizer).

The checkpoint holds the student's trained weights, not its architecture or tokenizer: those
are read from the base model the run started from (`model.student` in its config), which must
still be reachable; `--student` points elsewhere when it has moved.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from renio_pl.errors import ConfigError
from renio_pl.models import LoRA, load_model, load_tokenizer, policy_weights
from renio_pl.report import OneLineParser

__all__ = ["read_checkpoint", "student_from_checkpoint", "save_student", "export", "main"]

log = logging.getLogger(__name__)

_STUDENT = "student."  # the student's prefix in a DistillationModule state dict


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a Lightning `.ckpt` file written by a renio-pl fit.

    Raises:
        ConfigError: no such file, a sharded checkpoint folder, or not a renio-pl checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path} is a sharded checkpoint folder (FSDP or DeepSpeed); consolidate it into one file first "
            "(FSDP: python -m lightning.fabric.utilities.consolidate_checkpoint; DeepSpeed: "
            "lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict) and export that"
        )
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    try:
        # Not weights_only: a checkpoint of a module built outside the CLI pickles its LoRA settings (your own file).
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"cannot read {path} as a checkpoint: {str(error).strip().splitlines()[0]}") from error
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if "student" not in checkpoint.get("hyper_parameters", {}) or not any(k.startswith(_STUDENT) for k in state):
        raise ConfigError(f"{path} is not a checkpoint of renio-pl fit or renio-pl-redi fit (no student in it)")
    return checkpoint


def student_from_checkpoint(
    checkpoint: dict[str, Any], student: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The trained student of a checkpoint (a peft model for a LoRA run), its tokenizer and its base model.

    Args:
        checkpoint: from `read_checkpoint`.
        student: where the base model the run started from is now; None reads `model.student` from the checkpoint.
    Returns:
        (student in eval mode, its tokenizer, the base model's hub id or folder).
    """
    hparams = checkpoint["hyper_parameters"]
    base = student or hparams["student"]
    option = "--student" if student else f"the checkpoint's model.student ({base}; give --student if it has moved)"
    lora = hparams.get("student_lora")
    if isinstance(lora, dict):  # as LightningCLI stores it
        lora = LoRA(**lora)
    model = load_model(base, hparams.get("dtype", "float32"), lora, option=option)
    weights = {k.removeprefix(_STUDENT): v for k, v in checkpoint["state_dict"].items() if k.startswith(_STUDENT)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"the checkpoint's student does not fit {base} (missing {missing[:2]}, unexpected {unexpected[:2]}); "
            "give --student the model the run started from"
        )
    return model.eval(), load_tokenizer(base, option=option), base


def save_student(
    student: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | Path, adapter: bool = False
) -> Path:
    """Write `student` and `tokenizer` as a Hugging Face folder (files already there are overwritten).

    Args:
        student: a causal LM, or a peft model (a LoRA student).
        adapter: write a LoRA student's adapter (PEFT folder) instead of its merged weights.
    Returns:
        `folder`.
    """
    folder = Path(folder)
    is_lora = hasattr(student, "get_base_model")
    if adapter and not is_lora:
        raise ConfigError("--adapter needs a LoRA run (model.student_lora); this student was trained whole: export it without --adapter")
    base = student.get_base_model() if is_lora else student
    if adapter:
        for config in student.peft_config.values():  # an absolute base path, so the folder works from anywhere
            if Path(config.base_model_name_or_path).expanduser().exists():
                config.base_model_name_or_path = str(Path(config.base_model_name_or_path).expanduser().resolve())
        student.save_pretrained(folder)
    else:
        generation = base.generation_config
        if generation is not None:  # a model that stops and pads like the tokenizer says
            generation.eos_token_id = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
            generation.pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
        base.save_pretrained(folder, state_dict=dict(policy_weights(student)))  # LoRA merged: the weights it samples with
    tokenizer.save_pretrained(folder)  # with its chat template
    return folder


def export(checkpoint_path: str | Path, folder: str | Path, adapter: bool = False, student: str | None = None) -> Path:
    """`renio-pl-export`: the student of `checkpoint_path` as a Hugging Face folder (see the module's doc)."""
    checkpoint = read_checkpoint(checkpoint_path)
    model, tokenizer, _ = student_from_checkpoint(checkpoint, student)
    save_student(model, tokenizer, folder, adapter)
    log.info(
        "exported the student of %s (epoch %s, step %s) to %s%s", checkpoint_path, checkpoint.get("epoch"),
        checkpoint.get("global_step"), folder, " as a LoRA adapter" if adapter else "",
    )
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-export`."""
    parser = OneLineParser(prog="renio-pl-export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", help="a .ckpt file of the run (e.g. runs/demo/version_0/checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="the folder to write (created; files already there are overwritten)")
    parser.add_argument("--adapter", action="store_true", help="write a LoRA run's adapter (PEFT folder), not merged weights")
    parser.add_argument("--student", help="the base model the run started from, when it is no longer where the config says")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.checkpoint, args.out_dir, args.adapter, args.student)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

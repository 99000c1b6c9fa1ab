"""Fit-start guards (`renio_pl.guards`): half-precision trainable weights and stale rollout rounds."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from renio_pl.cli import main
from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.models import LoRA
from renio_pl.module import DistillationModule
from renio_pl.rollouts import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def fit_args(model_dirs, prompt_file, tmp_path) -> list[str]:
    return ["fit", "--model.student", str(model_dirs["student"]), "--model.teacher", str(model_dirs["teacher"]),
            "--data.train_path", str(prompt_file), "--data.prompts_per_epoch", "2", "--data.batch_size", "2",
            "--data.sampling.max_new_tokens", "3", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path)]


def test_bf16_true_lora_is_one_line_error_through_renio_pl(model_dirs, prompt_file, tmp_path):
    """The 1.7B paper configs' old setting: bf16-true casts the fp32 LoRA adapter to bf16."""
    command = [str(Path(sys.executable).parent / "renio-pl"), *fit_args(model_dirs, prompt_file, tmp_path),
               "--model.dtype", "bfloat16", "--model.student_lora.r", "4", "--trainer.precision", "bf16-true"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "trainable parameters are held in bfloat16 (e.g. " in errors[0] and "lora_" in errors[0]
    assert "bf16-mixed" in errors[0] and "float32" in errors[0]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_full_bf16_student_is_one_line_error(model_dirs, prompt_file, tmp_path, capsys):
    code, err = run_cli(fit_args(model_dirs, prompt_file, tmp_path) + ["--model.dtype", "bfloat16"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "trainable parameters are held in bfloat16" in lines[0] and "model.dtype: float32" in lines[0]


def test_reload_every_two_epochs_is_one_line_error(model_dirs, prompt_file, tmp_path, capsys):
    code, err = run_cli(fit_args(model_dirs, prompt_file, tmp_path)
                        + ["--trainer.reload_dataloaders_every_n_epochs", "2"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: trainer.reload_dataloaders_every_n_epochs is 2") and "set it to 1" in lines[0]


def test_lightning_default_reload_is_set_to_one_and_rounds_regenerate(model_dirs, prompt_file):
    """Without the guard, Lightning's default 0 would serve round 0's rollouts in epoch 1 too."""
    model = DistillationModule(str(model_dirs["student"]), str(model_dirs["teacher"]), evaluate_before_fit=False,
                               diagnostics=None)
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(model_dirs["student"]), prompts_per_epoch=2,
                              batch_size=2, sampling=SamplingConfig(n=1, max_new_tokens=3))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    assert trainer.reload_dataloaders_every_n_epochs == 0
    trainer.fit(model, data)
    assert trainer.reload_dataloaders_every_n_epochs == 1
    assert data._round_epoch == 1 and trainer.global_step == 2  # round 1 was sampled for epoch 1


def test_bf16_mixed_with_lora_on_a_bf16_base_trains_every_adapter_entry(model_dirs, prompt_file):
    """The paper configs' setting: frozen bf16 base, fp32 adapters (peft), bf16 autocast: lora_A moves too."""
    model = DistillationModule(str(model_dirs["student"]), str(model_dirs["teacher"]), dtype="bfloat16",
                               student_lora=LoRA(r=4, alpha=8), evaluate_before_fit=False, diagnostics=None,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=5e-6, weight_decay=0.0))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    data = OnPolicyDataModule(str(prompt_file), tokenizer=str(model_dirs["student"]), prompts_per_epoch=2,
                              batch_size=2, sampling=SamplingConfig(n=1, max_new_tokens=4))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, data)
    after = dict(model.named_parameters())
    for name, before in trainable.items():
        changed = (after[name].detach() != before).float().mean().item()
        assert changed > 0.9, (name, changed)  # lora_B from step 1, lora_A from step 2 (B is 0 at first)

"""End to end on CPU: a user's own Trainer around our LightningModule and DataModule."""

import csv
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.losses import weighted_loss
from renio_pl.models import LoRA
from renio_pl.module import DistillationModule
from renio_pl.rollouts import Rollout, SamplingConfig, collate_rollouts
from renio_pl.weighters import ReNIOWeighter

README = Path(__file__).resolve().parents[1] / "README.md"


def test_fit_trains_student_and_freezes_teacher(model_dirs, prompt_file, tmp_path):
    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    model = DistillationModule(student, teacher, weighter=ReNIOWeighter(threshold=0.0))
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, val_path=str(prompt_file),
        sampling=SamplingConfig(n=2, max_new_tokens=5), val_sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=3),
        prompts_per_epoch=4, batch_size=4,
    )
    before_student = {k: v.clone() for k, v in model.student.state_dict().items()}
    before_teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        reload_dataloaders_every_n_epochs=1, log_every_n_steps=1, enable_progress_bar=False,
    )
    trainer.fit(model, data)
    assert any(not torch.equal(before_student[k], v) for k, v in model.student.state_dict().items())
    assert all(torch.equal(before_teacher[k], v) for k, v in model.teacher.state_dict().items())
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in model.teacher.parameters()}
    assert not any(k.startswith("_frozen") or "teacher" in k for k in model.state_dict())
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/kl", "weights/mean", "weights/max", "weights/pivotal_share",
            "rollout/len_mean", "rollout/accuracy", "val/accuracy"} <= logged
    assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows if r["train/loss"])
    assert rows[0]["step"] == "0" and rows[0]["val/accuracy"]  # held-out accuracy before training


def test_readme_own_pipeline_example_runs(model_dirs, prompt_file, tmp_path, monkeypatch):
    """Runs the README's 'your own Trainer' code block verbatim against tiny models."""
    block = re.search(r"<!-- own-pipeline -->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    assets = tmp_path / "demo_assets"
    for name in ("student", "teacher"):
        shutil.copytree(model_dirs[name], assets / name)
    shutil.copy(prompt_file, assets / "train.jsonl")
    shutil.copy(prompt_file, assets / "heldout.jsonl")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace("max_epochs=3", "max_epochs=1"), "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step > 0
    assert (tmp_path / "runs" / "own").is_dir()


def test_a_batch_weighted_all_zero_makes_no_update_and_is_logged(model_dirs, prompt_file, tmp_path):
    """OracleWeighter(correct_only) on a random student: nothing is correct, so no step changes it."""
    from renio_pl.weighters import OracleWeighter

    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    model = DistillationModule(student, teacher, weighter=OracleWeighter(mode="correct_only"))
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, sampling=SamplingConfig(n=2, max_new_tokens=4), prompts_per_epoch=4,
        batch_size=4,
    )
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        log_every_n_steps=1, enable_progress_bar=False,
    )
    trainer.fit(model, data)
    assert all(torch.equal(before[k], v) for k, v in model.student.state_dict().items())  # not even Adam moved it
    rows = [r for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if r.get("train/loss")]
    assert rows and all(r["train/skipped_step"] == "1.0" and float(r["train/loss"]) == 0.0 for r in rows)
    assert all(r["rollout/accuracy"] == "0.0" for r in rows)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(model_dirs, prompt_file, tmp_path):
    """A learning rate that grows 1e12-fold a step blows the weights up; no broken checkpoint is saved."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "renio_pl.cli", "fit", "--model.student", str(model_dirs["student"]),
        "--model.teacher", str(model_dirs["teacher"]), "--data.train_path", str(prompt_file),
        "--data.sampling.max_new_tokens", "4", "--data.prompts_per_epoch", "4", "--data.batch_size", "2",
        "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "1e-3",
        "--model.lr_scheduler", "torch.optim.lr_scheduler.ExponentialLR", "--model.lr_scheduler.gamma", "1e12", "--trainer.max_epochs", "5",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ})
    assert done.returncode == 1, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert re.match(r"error: (the training loss is not finite|the update made the student's weights NaN or inf)", last_line)
    assert "Traceback" not in done.stderr
    assert str(tmp_path / "ckpt" / "last.ckpt") in last_line
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_lora_student_fits_and_only_its_adapters_change(model_dirs, prompt_file, tmp_path):
    from renio_pl.models import LoRA

    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    model = DistillationModule(student, teacher, student_lora=LoRA(r=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, sampling=SamplingConfig(n=2, max_new_tokens=4), prompts_per_epoch=4, batch_size=4
    )
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    after = model.student.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in model.student.named_parameters() if "lora_" in n}


def test_prompts_too_long_are_dropped_and_counted(model_dirs, prompt_file, tmp_path):
    from renio_pl.prompt_format import PromptFormat, render_prompt
    from renio_pl.prompts import load_rows

    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    model = DistillationModule(student, teacher)
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, sampling=SamplingConfig(n=1, max_new_tokens=3), prompts_per_epoch=2,
        batch_size=2, long_prompts="drop",
    )
    lengths = [len(render_prompt(data.tokenizer, r.problem, PromptFormat())) for r in load_rows(str(prompt_file), "prompt", "answer")]
    data.max_prompt_tokens = max(lengths) - 1
    expected = sum(length > data.max_prompt_tokens for length in lengths)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(model, data)
    assert 0 < expected < len(lengths) and len(data.train_rows) == len(lengths) - expected
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    assert float(rows[0]["data/dropped_prompts"]) == expected


def test_records_without_an_answer_are_dropped_and_counted(model_dirs, tmp_path):
    import json

    path = tmp_path / "partly_answered.jsonl"
    answers = ["1", None, "3", "", "5"]
    path.write_text("".join(json.dumps({"prompt": f"{i}+0=", "answer": a}) + "\n" for i, a in enumerate(answers)))
    data = OnPolicyDataModule(str(path), tokenizer=str(model_dirs["student"]))
    data.setup("fit")
    assert [row.index for row in data.train_rows] == [0, 2, 4] and data.dropped_prompts == 2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dirs, lora):
    rollouts = [Rollout([5, 6, 7], [8, 9, 10, 1], 0, 1.0), Rollout([5, 6], [11, 1], 1, 1.0), Rollout([7], [12, 13], 2, 1.0)]
    batch = collate_rollouts(rollouts, pad_token_id=0)
    grads, losses = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA weights in both modules (A is drawn at load; B is set below)
        module = DistillationModule(str(model_dirs["student"]), str(model_dirs["teacher"]), chunk_tokens=2,
                                    student_lora=LoRA(r=4, alpha=8, dropout=0.0) if lora else None,
                                    gradient_checkpointing=checkpointing)
        for name, parameter in module.student.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)  # LoRA's B starts at zero: make the adapters matter
        scores = module.score(batch)
        loss = weighted_loss(scores.token_loss, batch.completion_mask, torch.tensor([1.5, 0.5, 1.0]))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in module.student.named_parameters() if p.requires_grad})
    assert module.student.is_gradient_checkpointing
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)

"""End to end on CPU: a user's own Trainer around our LightningModule and DataModule."""

import csv
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.module import DistillationModule
from renio_pl.rollouts import SamplingConfig
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

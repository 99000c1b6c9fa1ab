"""Exact resume: a fit killed with SIGKILL mid-epoch and resumed from `last` matches the uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import REPO, small_fit


class KillAtStep(pl.Callback):
    """Sends SIGKILL to its own process once `step` optimizer steps are done (test scaffolding)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(pl.Callback):
    """Appends each trained batch's sampled tokens, loss and weights to a jsonl file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        record = {
            "step": trainer.global_step, "epoch": trainer.current_epoch,
            "tokens": batch.completion_ids.masked_fill(~batch.completion_mask, -1).tolist(),
            "loss": float(outputs["loss"]).hex(),
            "weights_mean": float(metrics["weights/mean"]).hex(), "weights_max": float(metrics["weights/max"]).hex(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def fit(model_dirs, prompt_file, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    record = {"class_path": "tests.test_resume.RecordBatches", "init_args": {"path": str(folder / "batches.jsonl")}}
    return small_fit(model_dirs, prompt_file, folder, [record], *extra)


def records(folder: Path) -> dict[int, dict]:
    """Trained batches by step (a resumed run's file holds both of its attempts; later ones win)."""
    lines = (folder / "batches.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_exact(model_dirs, prompt_file, tmp_path):
    whole = fit(model_dirs, prompt_file, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(model_dirs, prompt_file, tmp_path / "killed", "--trainer.callbacks+=tests.test_resume.KillAtStep",
                 "--trainer.callbacks.step=6")
    assert killed.returncode == -signal.SIGKILL
    resumed = fit(model_dirs, prompt_file, tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = records(tmp_path / "whole"), records(tmp_path / "killed")
    assert sorted(expected) == sorted(got) == list(range(1, 13))  # 3 rounds of 4 steps, none lost or repeated
    for step in expected:
        assert got[step] == expected[step], f"step {step} differs after the resume"
    final = [torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (tmp_path / "whole", tmp_path / "killed")]
    assert final[0]["global_step"] == final[1]["global_step"] == 12
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), name


SAVER = """
import sys, torch
from renio_pl.checkpointing import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for i in range(10_000):
    io.save_checkpoint({"step": i, "weights": torch.full((4_000_000,), float(i))}, path)
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.35, 0.6, 0.9])
def test_a_kill_during_a_save_leaves_a_loadable_checkpoint(tmp_path, delay):
    """SIGKILL a process that keeps rewriting a 16 MB checkpoint; the file always loads whole."""
    import time

    path = tmp_path / "last.ckpt"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert saver.stdout.readline().strip() == "0"  # one complete save exists
    time.sleep(delay)
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["step"])))
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    from renio_pl.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": -1}, path)  # the next save clears a killed save's staging file
    assert not list(tmp_path.glob(".last.ckpt.*.tmp")) and len(leftovers) <= 1


def test_ckpt_path_last_finds_the_checkpoint_of_an_earlier_logger_version(model_dirs, prompt_file, tmp_path):
    """With a CSVLogger each run logs (and checkpoints) in a new `version_<n>`; `last` must still resume."""
    trainer = {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": ""}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"every_n_train_steps": 1, "save_last": True}}],
    }
    first = small_fit(model_dirs, prompt_file, tmp_path, [], "--trainer.max_steps", "2", trainer=trainer)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = small_fit(model_dirs, prompt_file, tmp_path, [], "--trainer.max_steps", "4", "--ckpt_path", "last",
                        trainer=trainer)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--ckpt_path last: resuming from {last}" in resumed.stdout + resumed.stderr
    rows = list(csv.DictReader(open(tmp_path / "version_1" / "metrics.csv")))
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [2, 3]  # steps 3 and 4, not a fresh run

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


def metrics_steps(folder: Path) -> list[int]:
    """Steps of the logged training losses in a CSVLogger folder."""
    return sorted(int(r["step"]) for r in csv.DictReader(open(folder / "metrics.csv")) if r.get("train/loss"))


def test_ckpt_path_last_resumes_the_runs_own_checkpoint_refuses_other_settings_and_stops_when_done(
    model_dirs, prompt_file, tmp_path
):
    """CSVLogger runs (a new `version_<n>` each) under one root: `last` picks the newest trained with this run's settings."""
    trainer = {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": ""}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"every_n_train_steps": 1, "save_last": True}},
                      {"class_path": "renio_pl.callbacks.TrainingPlot"}],
    }

    def fit(*extra: str) -> subprocess.CompletedProcess:
        return small_fit(model_dirs, prompt_file, tmp_path, [], *extra, trainer=trainer)

    first = fit("--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    own = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    other = fit("--trainer.max_steps", "2", "--model.optimizer.lr", "0.02")  # another run, newer, other settings
    assert other.returncode == 0, other.stderr[-3000:]
    assert (tmp_path / "version_1" / "checkpoints" / "last.ckpt").stat().st_mtime > own.stat().st_mtime

    resumed = fit("--trainer.max_steps", "4", "--ckpt_path", "last")  # a longer run may resume: max_steps does not shape it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--ckpt_path last: resuming from {own}" in resumed.stdout + resumed.stderr
    assert metrics_steps(tmp_path / "version_2") == [2, 3]  # steps 3 and 4, not a fresh run (logged in a new version)
    own = tmp_path / "version_2" / "checkpoints" / "last.ckpt"
    assert torch.load(own, weights_only=False)["global_step"] == 4

    refused = fit("--trainer.max_steps", "6", "--ckpt_path", "last", "--model.weighter.init_args.threshold", "0.5")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --ckpt_path last: {own} was trained with model.weighter.init_args.threshold=0.0, this run sets 0.5; "
        "resume with the run's own settings, or start a new run without --ckpt_path (or with another "
        "trainer.default_root_dir)"
    )

    finished = fit("--trainer.max_steps", "4", "--ckpt_path", "last")
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert f"the run of {own} has finished: it reached trainer.max_steps=4 (step 4); nothing to resume" in (
        finished.stdout + finished.stderr
    )
    assert not (tmp_path / "version_3").exists()  # nothing logged


def test_training_settings_are_what_shapes_the_updates():
    """Extending a run, watching it differently or changing its engine keeps it resumable; its recipe does not."""
    from renio_pl.resume import first_difference

    saved = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 30, "max_steps": -1, "accumulate_grad_batches": 1, "logger": {"class_path": "CSVLogger"}},
        "model": {"student": "s", "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4}},
                  "chunk_tokens": 4096, "diagnostics": {"init_args": {"markers": ["wait"]}}},
        "data": {"train_path": "t.jsonl", "seed": 0, "sampling": {"n": 4, "temperature": 1.0}, "val_sampling": {"n": 1},
                 "engine": {"class_path": "renio_pl.rollouts.HFGenerator"}, "prompts_per_epoch": 128},
    }

    def changed(key: str, value) -> dict:
        config = json.loads(json.dumps(saved))
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        return config

    for key, value in [("seed_everything", 1), ("trainer.max_epochs", 60), ("trainer.max_steps", 100), ("trainer.logger", None),
                       ("model.chunk_tokens", 512), ("model.diagnostics.init_args.markers", []),
                       ("data.val_sampling.n", 4), ("data.engine.class_path", "renio_pl.vllm_engine.VLLMGenerator")]:
        assert first_difference(saved, changed(key, value)) is None, key
    for key, value in [("data.seed", 1), ("trainer.accumulate_grad_batches", 2),
                       ("model.optimizer.init_args.lr", 1e-3), ("model.student", "other"),
                       ("data.sampling.temperature", 0.7), ("data.prompts_per_epoch", 64), ("data.train_path", "u.jsonl")]:
        assert first_difference(saved, changed(key, value))[0] == key

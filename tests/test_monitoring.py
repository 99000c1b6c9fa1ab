"""What a run shows: the per-step vitals, the run's own history with any logger, completions, progress, log lines."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from renio_pl.callbacks import TrainingPlot
from renio_pl.history import read_series
from renio_pl.monitoring import RoundStats, markdown_table, missing_package_message, truncated
from renio_pl.progress import GenerationProgress
from renio_pl.report import main as report_main
from renio_pl.rollouts import HFGenerator, Rollout, SamplingConfig
from tests.conftest import small_fit, tiny_qwen3, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def test_truncated_is_no_eos_at_the_end():
    # rows: [5, 1] ends in EOS 1; [5, 6, 7] ran to the limit; [2] is EOS 2 alone; [4, 4, 2] ends in EOS 2
    ids = torch.tensor([[5, 1, 0], [5, 6, 7], [2, 0, 0], [4, 4, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert truncated(ids, mask, [1, 2]).tolist() == [False, True, False, False]
    assert truncated(ids, mask, [1]).tolist() == [False, True, True, True]


def test_round_stats_rate():
    rollouts = [Rollout([1], [3] * n, 0, 1.0) for n in (4, 6)]  # 10 tokens in 2.5 s
    stats = RoundStats.of(3, rollouts, 2.5)
    assert (stats.completions, stats.tokens) == (2, 10)
    assert stats.metrics() == {"time/sampling_s": 2.5, "rollout/tokens_per_s": 4.0}


def test_markdown_table_escapes_pipes_and_newlines():
    table = markdown_table([{"completion": "a|b\nc", "weight": 1.5, "correct": None}])
    assert table.splitlines() == ["| completion | weight | correct |", "|---|---|---|", "| a\\|b ⏎ c | 1.5 |  |"]


def test_missing_logger_package_is_one_line_with_the_extra():
    tensorboard = ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available. Try `pip install`ing either.")
    wrapped = ValueError("Does not validate against any of the Union subtypes")
    wrapped.__cause__ = ValueError("Problem with given class_path 'lightning.pytorch.loggers.TensorBoardLogger'")
    wrapped.__cause__.__cause__ = tensorboard
    assert missing_package_message(wrapped) == (
        "this config needs the tensorboard package, which is not installed: pip install 'renio-pl[tensorboard]'"
    )
    wandb = ModuleNotFoundError("Requirement 'wandb>=0.12.10' not met. HINT: Try running `pip install -U 'wandb>=0.12.10'`")
    assert missing_package_message(wandb).endswith("pip install 'renio-pl[wandb]'")
    assert missing_package_message(ValueError("some other problem")) is None


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "WandbLogger"])
def test_cli_missing_logger_package_is_one_line(logger, model_dirs, prompt_file, tmp_path):
    package = {"TensorBoardLogger": "tensorboard", "WandbLogger": "wandb"}[logger]
    if any((Path(p) / package).is_dir() for p in sys.path if p):
        pytest.skip(reason=f"{package} is installed here: the missing-package error cannot be shown")
    done = subprocess.run(
        [sys.executable, "-m", "renio_pl.cli", "fit", "--model.student", str(model_dirs["student"]),
         "--data.train_path", str(prompt_file), "--trainer.logger", logger, "--trainer.logger.save_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: this config needs the {package} package, which is not installed: pip install 'renio-pl[{package}]'"
    ], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_generation_progress_counts_completions_and_tokens_during_generate():
    tokenizer = tiny_tokenizer()
    model = tiny_qwen3(0, len(tokenizer))
    eos = [tokenizer.eos_token_id]
    seen: list[tuple[int, int]] = []

    class Recording(GenerationProgress):
        def _show(self, done_in_call, tokens_in_call):
            super()._show(done_in_call, tokens_in_call)
            seen.append((self.done, self.tokens))

    prompts = [tokenizer.encode(f"{a}+{a}=") for a in range(3)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6)
    progress = Recording(6, eos, disable=True)
    generator = HFGenerator(batch_size=2)
    import renio_pl.rollouts as rollouts_module

    original = rollouts_module.GenerationProgress
    rollouts_module.GenerationProgress = lambda total, eos_ids, disable: progress  # observe the real bar's counts
    try:
        completions = generator.generate(model, tokenizer, prompts, sampling, [1, 2, 3])
    finally:
        rollouts_module.GenerationProgress = original
    flat = [c for group in completions for c in group]
    assert progress.done == 6 and progress.tokens == sum(len(c) for c in flat)
    # every generate call (2 prompts x 2 samples, then 1 x 2) reports per decoding step, not only at its end
    assert len(seen) >= 2 * sampling.max_new_tokens
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)  # never goes back
    assert seen[sampling.max_new_tokens - 1][0] == 4  # after the first call's steps and its finish: 4 completions
    progress.close()


@pytest.fixture(scope="module")
def monitored_run(model_dirs, prompt_file, tmp_path_factory) -> Path:
    """`renio-pl fit` (3 rounds of 4 steps: 4 prompts x 2 samples in batches of 2) with a CSVLogger, TrainingPlot and the default TrainingMonitor."""
    folder = tmp_path_factory.mktemp("monitored")
    done = small_fit(
        model_dirs, prompt_file, folder, [{"class_path": "renio_pl.callbacks.TrainingPlot"}],
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(folder), "--trainer.logger.name", "",
        "--trainer.gradient_clip_val", "1e-6", "--monitor.sample_completions", "3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_every_step_logs_lr_grad_norm_truncation_and_stage_times(monitored_run):
    series = read_series(monitored_run / "version_0" / "history.jsonl")
    steps = list(range(12))
    for name in ("train/lr", "train/grad_norm", "rollout/truncated_share", "time/scoring_s", "time/update_s",
                 "train/loss"):
        assert [step for step, _ in series[name]] == steps, name
    # StepLR(step_size 3, gamma 0.5) from lr 0.01, stepped after every update: the lr each update used
    assert [value for _, value in series["train/lr"]] == pytest.approx([0.01 * 0.5 ** (k // 3) for k in steps])
    # clipping at 1e-6 leaves the logged norm unclipped (logged before clipping)
    assert all(value > 1e-4 for _, value in series["train/grad_norm"])
    assert all(0.0 <= value <= 1.0 for _, value in series["rollout/truncated_share"])
    assert all(value > 0 for _, value in series["time/scoring_s"])
    # once per round, at its first step
    assert [step for step, _ in series["time/sampling_s"]] == [0, 4, 8]
    assert all(value > 0 for _, value in series["rollout/tokens_per_s"])
    assert "memory/peak_gib" not in series  # CPU: no accelerator memory to report
    # the history holds exactly what the CSV logger wrote
    csv_series = read_series(monitored_run / "version_0" / "metrics.csv")
    assert csv_series["train/grad_norm"] == series["train/grad_norm"]


def test_completions_table_every_round(monitored_run):
    records = [json.loads(line) for line in (monitored_run / "version_0" / "completions.jsonl").read_text().splitlines()]
    # 3 asked for, 2 shown: the round's first batch has 2 rollouts
    assert [r["epoch"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert [r["step"] for r in records] == [0, 0, 4, 4, 8, 8]
    for record in records:
        assert set(record) == {"step", "epoch", "prompt", "completion", "weight", "correct", "tokens", "truncated"}
        assert record["prompt"].startswith("u:What is ") and 1 <= record["tokens"] <= 5
        assert record["weight"] >= 0 and isinstance(record["correct"], bool)
        assert not record["truncated"] or record["tokens"] == 5  # cut off only at max_new_tokens
    markdown = (monitored_run / "version_0" / "completions.md").read_text()
    assert markdown.count("## Round") == 3 and "| prompt | completion | weight | correct | tokens | truncated |" in markdown


def test_plot_leaves_out_the_mean_weight_and_the_report_reads_the_history(monitored_run, tmp_path):
    assert (monitored_run / "version_0" / "training.png").read_bytes()[:8] == PNG
    assert not any("weights/mean" in panel for panel in TrainingPlot().panels)
    (monitored_run / "version_0" / "metrics.csv").rename(tmp_path / "metrics.csv")  # the report needs only ours
    try:
        report_main([str(monitored_run), "--out", str(tmp_path / "report")])
    finally:
        (tmp_path / "metrics.csv").rename(monitored_run / "version_0" / "metrics.csv")
    assert "From `" + str(monitored_run / "version_0" / "history.jsonl") in (tmp_path / "report" / "summary.md").read_text()


def test_history_without_any_logger(model_dirs, prompt_file, tmp_path):
    """`logger: false`: the history and the plot go to `default_root_dir`, where checkpoints would go too."""
    done = small_fit(model_dirs, prompt_file, tmp_path, [{"class_path": "renio_pl.callbacks.TrainingPlot"}],
                     "--trainer.max_epochs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [step for step, _ in read_series(tmp_path / "history.jsonl")["train/loss"]] == [0, 1, 2, 3]
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG


def test_a_finished_run_started_again_does_not_crash_the_plot(model_dirs, prompt_file, tmp_path):
    """Its second fit logs into a new, empty CSV version folder: no plot there, one line saying why, exit 0."""
    callbacks = [{"class_path": "renio_pl.callbacks.TrainingPlot"}]
    csv = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.name", ""]
    first = small_fit(model_dirs, prompt_file, tmp_path, callbacks, "--trainer.max_epochs", "1", *csv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "version_0" / "training.png").is_file()
    again = small_fit(model_dirs, prompt_file, tmp_path, callbacks, "--trainer.max_epochs", "1", *csv,
                      "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert not (tmp_path / "version_1" / "training.png").exists()


def test_fit_shows_the_modules_log_lines(model_dirs, prompt_file, tmp_path):
    done = small_fit(model_dirs, prompt_file, tmp_path, [], "--trainer.max_epochs", "1",
                     "--data.val_path", str(prompt_file),
                     "--data.val_sampling", json.dumps({"n": 1, "temperature": 0.0, "max_new_tokens": 3}))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("held-out accuracy before training: "))
    assert math.isfinite(float(line.rpartition(" ")[2]))


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "WandbLogger"])
def test_tensorboard_and_wandb_get_the_metrics_the_table_and_the_plot(logger, model_dirs, prompt_file, tmp_path,
                                                                     monkeypatch):
    """With TensorBoard or W&B (offline) as the only logger: their own files, plus our history, plot and report."""
    package = {"TensorBoardLogger": "tensorboard", "WandbLogger": "wandb"}[logger]
    pytest.importorskip(package)
    options = ["--trainer.logger", logger, "--trainer.logger.save_dir", str(tmp_path)]
    if logger == "WandbLogger":
        options += ["--trainer.logger.offline", "true", "--trainer.logger.project", "proj"]
    monkeypatch.setenv("WANDB_SILENT", "true")
    done = small_fit(model_dirs, prompt_file, tmp_path, [{"class_path": "renio_pl.callbacks.TrainingPlot"}],
                     "--trainer.max_epochs", "2", *options)
    assert done.returncode == 0, done.stderr[-3000:]
    (history,) = tmp_path.rglob("history.jsonl")
    run = history.parent
    if logger == "TensorBoardLogger":
        assert run == tmp_path / "lightning_logs" / "version_0"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0}).Reload()
        assert [e.step for e in events.Scalars("train/grad_norm")] == list(range(8))
        texts = events.Tensors("completions/text_summary")
        assert [e.step for e in texts] == [0, 4]  # one table per round
        assert b"| prompt | completion | weight |" in texts[0].tensor_proto.string_val[0]
    else:
        assert run.parent == tmp_path / "proj"  # save_dir/<project>/<run id>, beside the checkpoints Lightning puts there
        tables = list(tmp_path.rglob("completions_*.table.json"))
        assert len(tables) == 2, tables  # one per round
        table = json.loads(tables[0].read_text())
        assert table["columns"] == ["prompt", "completion", "weight", "correct", "tokens", "truncated"]
    series = read_series(history)
    assert [step for step, _ in series["train/grad_norm"]] == list(range(8))
    assert (run / "training.png").read_bytes()[:8] == PNG
    report_main([str(tmp_path), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "accuracy.png").read_bytes()[:8] == PNG

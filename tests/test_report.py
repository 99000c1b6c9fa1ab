"""`renio-pl-report` and `renio-pl-sweep`: figures and tables from real runs' metrics.csv; bad input -> one line, exit 2."""

import csv
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from renio_pl.callbacks import read_series
from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.errors import ConfigError
from renio_pl.module import DistillationModule
from renio_pl.report import main as report_main
from renio_pl.report import summarize, weighter_names
from renio_pl.rollouts import SamplingConfig
from renio_pl.sweep import SweepRun, run_fit, sweep_runs
from renio_pl.sweep_tables import aggregate, first_epochs, mean_curve, run_metrics
from renio_pl.sweep import main as sweep_main
from renio_pl.weighters import ReNIOWeighter
from tests.test_diagnostics import even_length

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(model_dirs, prompt_file, tmp_path_factory) -> Path:
    """A real 4-step fit (2 rounds) with labelled rollouts, logged by a CSVLogger."""
    folder = tmp_path_factory.mktemp("run")
    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    model = DistillationModule(student, teacher, weighter=ReNIOWeighter(threshold=0.0))
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, val_path=str(prompt_file), sampling=SamplingConfig(n=2, max_new_tokens=5),
        val_sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=3), prompts_per_epoch=4, batch_size=4,
        verifier=even_length,
    )
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=pl.loggers.CSVLogger(folder, name=""), enable_checkpointing=False,
        reload_dataloaders_every_n_epochs=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    return folder


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted({k for row in rows for k in row})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_report_of_a_real_run_writes_every_figure_and_the_summary(run_dir, tmp_path):
    report_main([str(run_dir), "--out", str(tmp_path / "report")])
    for name in ("weights_vs_correctness.png", "length_markers.png", "markers.png", "accuracy.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG, name
    summary = (tmp_path / "report" / "summary.md").read_text()
    for weighter in ("active", "uniform", "length", "entropy", "renio"):
        assert f"\n| {weighter} | " in summary
    assert "| generated tokens | " in summary and "| marker `let_me_check` | " in summary
    assert "\n| uniform | 0.500 | 0.500 | 1.000 | 1.000 |" in summary  # equal weights: AUROC 0.5, mean weight 1


def test_report_defaults_to_a_folder_in_the_run(run_dir):
    report_main([str(run_dir)])
    assert (run_dir / "report" / "accuracy.png").read_bytes()[:8] == PNG


def test_summary_numbers_worked_by_hand(tmp_path):
    rows = [
        {"step": 0, "val/accuracy": 0.5}, {"step": 3, "diag/active/auroc_incorrect": 0.6, "diag/renio/weight_correct": 1},
        {"step": 4, "val/accuracy": 0.75}, {"step": 7, "diag/active/auroc_incorrect": 0.8},
        {"step": 8, "val/accuracy": 0.625},
    ]
    series = read_series(_write_metrics(tmp_path / "metrics.csv", rows))
    assert summarize(series) == pytest.approx({
        "initial_accuracy": 0.5, "final_accuracy": 0.625, "best_accuracy": 0.75,
        "auroc_last_round": 0.8, "auroc_over_rounds": 0.7,  # (0.6 + 0.8) / 2
    })
    assert weighter_names(series) == ["active", "renio"]


@pytest.mark.parametrize("case", ["missing", "empty", "two_runs", "nothing_to_plot"])
def test_report_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    target = tmp_path / "run"
    if case != "missing":
        target.mkdir()
    if case == "two_runs":
        _write_metrics(target / "a" / "version_0" / "metrics.csv", [{"step": 0, "val/accuracy": 0.5}])
        _write_metrics(target / "b" / "version_0" / "metrics.csv", [{"step": 0, "val/accuracy": 0.5}])
    if case == "nothing_to_plot":
        _write_metrics(target / "version_0" / "metrics.csv", [{"step": 0, "train/loss": 1.0}])
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_newest_version_of_a_resumed_run_is_reported(tmp_path):
    old = _write_metrics(tmp_path / "version_0" / "metrics.csv", [{"step": 0, "val/accuracy": 0.1}])
    new = _write_metrics(tmp_path / "version_1" / "metrics.csv", [{"step": 0, "val/accuracy": 0.9}])
    os.utime(old, (1, 1))
    report_main([str(tmp_path), "--out", str(tmp_path / "r")])
    assert str(new) in (tmp_path / "r" / "summary.md").read_text()


def test_sweep_aggregates_mean_and_sample_std_over_seeds():
    def result(label, seed, accuracy, auroc, returncode=0):
        metrics = {"final_accuracy": accuracy, "best_accuracy": accuracy, "auroc_last_round": auroc,
                   "auroc_over_rounds": auroc}
        return {"label": label, "value": label, "seed": seed, "returncode": returncode, "metrics": metrics}

    rows = aggregate([result("a", 0, 0.5, 0.6), result("a", 1, 0.7, None), result("a", 2, 0.0, 0.0, returncode=1),
                      result("b", 0, 0.4, 0.9)])
    a, b = rows
    assert a["seeds"] == 2 and a["final_accuracy_mean"] == pytest.approx(0.6)
    assert a["final_accuracy_std"] == pytest.approx(0.1414213562)  # sqrt(((0.1)^2 + (0.1)^2) / (2 - 1))
    assert a["auroc_last_round_mean"] == 0.6 and a["auroc_last_round_std"] is None  # one seed logged it
    assert b["final_accuracy_std"] is None
    curve = mean_curve([[(0, 0.25), (4, 0.5)], [(0, 0.75), (4, 1.0), (8, 0.9)]])  # step 8: one seed only
    assert curve == [(0, 0.5), (4, 0.75)]


def test_first_epochs_reads_a_run_as_if_it_had_stopped_after_n_epochs():
    series = {"epoch": [(3, 0), (7, 1), (11, 2)], "val/accuracy": [(0, 0.5), (3, 0.6), (7, 0.9), (11, 0.4)],
              "diag/active/auroc_incorrect": [(3, 0.7), (7, 0.8), (11, 0.9)]}
    two = first_epochs(series, 2)
    assert two["val/accuracy"] == [(0, 0.5), (3, 0.6), (7, 0.9)]
    metrics = run_metrics(two)
    assert (metrics["initial_accuracy"], metrics["final_accuracy"], metrics["best_accuracy"]) == (0.5, 0.9, 0.9)
    assert metrics["auroc_last_round"] == 0.8 and metrics["auroc_over_rounds"] == pytest.approx(0.75)
    assert run_metrics(series)["final_accuracy"] == 0.4
    assert first_epochs(series, 4) is None  # the run stopped after 3 epochs


def test_sweep_runs_labels_folders_and_refuses_what_it_sets_itself(tmp_path):
    runs = sweep_runs("model.weighter", ["UniformWeighter", "oracle={class_path: OracleWeighter}"], [0, 1], tmp_path)
    assert [(r.label, r.value, r.seed) for r in runs] == [
        ("UniformWeighter", "UniformWeighter", 0), ("UniformWeighter", "UniformWeighter", 1),
        ("oracle", "{class_path: OracleWeighter}", 0), ("oracle", "{class_path: OracleWeighter}", 1),
    ]
    assert runs[3].folder == tmp_path / "oracle" / "seed1"
    args = runs[3].fit_args(Path("c.yaml"), ["--trainer.max_epochs", "2"])
    assert args[args.index("--model.weighter") + 1] == "{class_path: OracleWeighter}"
    assert args[args.index("--seed_everything") + 1] == "1" and args[args.index("--data.seed") + 1] == "1"
    with pytest.raises(ConfigError, match="sets seed_everything"):
        sweep_runs("data.seed", ["1"], [0], tmp_path)


def _tiny_config(model_dirs, prompt_file, path: Path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "reload_dataloaders_every_n_epochs": 1,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_checkpointing": False, "enable_model_summary": False},
        "model": {"student": str(model_dirs["student"]), "teacher": str(model_dirs["teacher"]),
                  "weighter": "ReNIOWeighter"},
        "data": {"train_path": str(prompt_file), "val_path": str(prompt_file),
                 "verifier": "tests.test_diagnostics.even_length",
                 "sampling": {"n": 2, "max_new_tokens": 5}, "val_sampling": {"n": 1, "temperature": 0.0, "max_new_tokens": 3},
                 "prompts_per_epoch": 4, "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("param, value", [("model.weighter.init_args.thresold", "0.4"), ("model.weighter", "NoWeighter")])
def test_sweep_bad_param_or_value_is_one_line_and_exit_2_before_any_run(param, value, model_dirs, prompt_file, tmp_path,
                                                                       capsys):
    config = _tiny_config(model_dirs, prompt_file, tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["--config", str(config), "--param", param, "--values", value, "--out", str(tmp_path / "sweep")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: value '{value}' of --param {param}: ") and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_over_weighters_runs_real_fits_and_tabulates(model_dirs, prompt_file, tmp_path, monkeypatch):
    """Two real `renio-pl fit` processes: uniform weights rank nothing (AUROC 0.5), the oracle filter everything (1.0)."""
    monkeypatch.chdir(ROOT)  # the runs import the test verifier from tests/
    config = _tiny_config(model_dirs, prompt_file, tmp_path / "tiny.yaml")
    out = tmp_path / "sweep"
    oracle = "incorrect_only={class_path: OracleWeighter, init_args: {mode: incorrect_only}}"
    sweep_main(["--config", str(config), "--param", "model.weighter", "--values", "uniform=UniformWeighter", oracle,
                "--seeds", "0", "--out", str(out), "--at-epochs", "1", "--", "--trainer.max_epochs", "2"])
    rows = {r["label"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
    assert set(rows) == {"uniform", "incorrect_only"} and all(r["seeds"] == "1" for r in rows.values())
    assert float(rows["uniform"]["auroc_last_round_mean"]) == 0.5
    assert float(rows["incorrect_only"]["auroc_last_round_mean"]) == 1.0
    assert rows["uniform"]["final_accuracy_mean"] != ""
    assert "| `incorrect_only` | 1 | " in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    result = json.loads((out / "uniform" / "seed0" / "result.json").read_text())
    assert result["returncode"] == 0 and "--trainer.max_epochs" in result["command"]
    logged = list((out / "uniform" / "seed0").glob("version_*/metrics.csv"))
    assert logged
    # After 1 of the 2 epochs: the held-out accuracy logged at epoch 0's last step.
    rows_logged = list(csv.DictReader(open(logged[0])))
    first_epoch = max(float(r["step"]) for r in rows_logged if r.get("epoch") == "0")
    after_one = [float(r["val/accuracy"]) for r in rows_logged if r.get("val/accuracy") and float(r["step"]) <= first_epoch]
    shorter = {r["label"]: r for r in csv.DictReader(open(out / "epochs1" / "sweep.csv"))}
    assert float(shorter["uniform"]["final_accuracy_mean"]) == pytest.approx(after_one[-1])
    assert (out / "epochs1" / "sweep.md").read_text().startswith("# Sweep over `model.weighter`, after 1 epoch\n")
    # The same command again is not rerun.
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("reran a finished run"))
    run = SweepRun("uniform", "UniformWeighter", 0, out / "uniform" / "seed0")
    assert run_fit(run, result["command"], [1]) == result

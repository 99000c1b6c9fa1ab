"""`renio-pl-sweep` as a grid: combinations, folders, 95% intervals and each method at its own best learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from renio_pl.errors import ConfigError
from renio_pl.sweep import sweep_runs
from renio_pl.sweep_tables import aggregate, best_over, interval95, run_metrics, sweep_markdown


def test_grid_runs_every_combination_in_its_own_folder(tmp_path):
    runs = sweep_runs(["model.weighter", "model.optimizer.init_args.lr"],
                      [["uniform=UniformWeighter", "renio=ReNIOWeighter"], ["1e-4", "3e-4"]], [0, 1], tmp_path)
    assert [(r.label, r.seed) for r in runs] == [
        (f"{w},{lr}", seed) for w in ("uniform", "renio") for lr in ("1e-4", "3e-4") for seed in (0, 1)
    ]
    assert runs[5].folder == tmp_path / "renio" / "1e-4" / "seed1"
    args = runs[5].fit_args(Path("c.yaml"), [])
    assert args[args.index("--model.weighter") + 1] == "ReNIOWeighter"
    assert args[args.index("--model.optimizer.init_args.lr") + 1] == "1e-4"
    assert args[args.index("--seed_everything") + 1] == "1"
    with pytest.raises(ConfigError, match="one --values after each --param"):
        sweep_runs(["a", "b"], [["1"]], [0], tmp_path)
    with pytest.raises(ConfigError, match="options must differ"):
        sweep_runs(["a", "a"], [["1"], ["2"]], [0], tmp_path)


def test_interval95_is_students_t():
    # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.303 -> 4.303 / sqrt(3) = 2.4843
    assert interval95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3**0.5)
    # five values 0.90, 0.92, 0.94, 0.96, 0.98: s = 0.0316228, t_{0.975, 4} = 2.776 -> 0.039259
    assert interval95([0.90, 0.92, 0.94, 0.96, 0.98]) == pytest.approx(2.776 * 0.0316228 / 5**0.5, rel=1e-5)
    assert interval95([0.5]) is None


def _result(label: str, seed: int, final: float, **extra) -> dict:
    metrics = {"final_accuracy": final, "best_accuracy": final, "auroc_last_round": None, "auroc_over_rounds": None,
               **extra}
    return {"label": label, "value": label, "seed": seed, "returncode": 0, "metrics": metrics}


def test_best_over_picks_each_methods_own_learning_rate(tmp_path):
    runs = sweep_runs(["model.weighter", "lr"], [["uniform=U", "renio=R"], ["1e-4", "3e-4"]], [0, 1], tmp_path)
    finals = {"uniform,1e-4": (0.80, 0.82), "uniform,3e-4": (0.90, 0.92), "renio,1e-4": (0.85, 0.87),
              "renio,3e-4": (0.70, 0.60)}
    results = [_result(label, seed, finals[label][seed], ess_share=0.5 + seed / 10,
                       **{"final_group_accuracy/carry": 0.25 * (seed + 1)}) for label in finals for seed in (0, 1)]
    rows = aggregate(results)
    best = {row["others"]: row for row in best_over(rows, runs, "lr")}
    assert best["uniform"]["best_value"] == "3e-4" and best["uniform"]["final_accuracy_mean"] == pytest.approx(0.91)
    assert best["renio"]["best_value"] == "1e-4" and best["renio"]["final_accuracy_mean"] == pytest.approx(0.86)
    # two seeds, s = 0.0141421, t_{0.975, 1} = 12.706 -> 12.706 * 0.0141421 / sqrt(2) = 0.12706
    assert best["renio"]["final_accuracy_ci95"] == pytest.approx(0.12706, rel=1e-4)
    assert best["renio"]["ess_share_mean"] == pytest.approx(0.55)
    assert best["renio"]["final_group_accuracy/carry_mean"] == pytest.approx(0.375)
    table = sweep_markdown("x", list(best.values()), "# best\n", first="options")
    assert "| `renio (best: 1e-4)` | 2 | 86.0 ± 12.7 | 86.0 ± 12.7 | 37.5 ± " in table
    assert "ESS share" in table and "AUROC" not in table  # columns nobody logged are left out


def test_run_metrics_reads_the_mechanism_and_group_accuracy():
    series = {
        "val/accuracy": [(0, 0.5), (8, 0.7), (16, 0.6)],
        "diag/active/ess_share": [(7, 0.8), (15, 0.6)],
        "diag/grad_norm": [(7, 2.0), (15, 4.0)],
        "val/group_accuracy/carry": [(0, 0.0), (16, 0.4), (8, 0.3)],
    }
    metrics = run_metrics(series)
    assert metrics["final_accuracy"] == 0.6 and metrics["best_accuracy"] == 0.7
    assert metrics["ess_share"] == pytest.approx(0.7) and metrics["grad_norm"] == 3.0
    assert metrics["top10_loss_share"] is None and metrics["final_group_accuracy/carry"] == 0.4

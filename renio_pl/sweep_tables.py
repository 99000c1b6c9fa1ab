"""The results of a sweep (`renio-pl-sweep`): each run's metrics, their mean and 95% interval
over seeds, the tables (csv and markdown, and the best value of one option) and the figure.

A result is the dict `renio_pl.sweep.run_fit` returns: `label`, `value`, `seed`, `returncode`,
`metrics` (`run_metrics`) and `metrics_at_epochs`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from math import sqrt
from statistics import mean, stdev
from typing import Protocol

from renio_pl.callbacks import plot_series, read_series
from renio_pl.history import Series
from renio_pl.report import find_metrics, summarize

__all__ = ["aggregate", "best_over", "first_epochs", "interval95", "mean_curve", "plot_sweep", "run_metrics",
           "sweep_markdown", "write_tables"]

METRICS = ("final_accuracy", "best_accuracy", "auroc_last_round", "auroc_over_rounds")
MECHANISM = {  # summary name -> the diagnostic averaged over rounds
    "ess_share": "diag/active/ess_share", "top10_loss_share": "diag/active/top10_loss_share", "grad_norm": "diag/grad_norm",
}
GROUP_PREFIX = "val/group_accuracy/"


class SweepRun(Protocol):
    """What the tables read of a run of the sweep (`renio_pl.sweep.SweepRun`)."""

    label: str
    folder: Path
    options: tuple[tuple[str, str, str], ...]


def first_epochs(series: Series, epochs: int) -> Series | None:
    """`series` as a run stopped after its first `epochs` epochs logged it: every point up to the
    last step of epoch `epochs - 1` (the evaluation before training included); None when the run
    did not finish that epoch."""
    steps = [step for step, epoch in series.get("epoch", []) if epoch == epochs - 1]
    if not steps:
        return None
    cut = max(steps)
    return {name: [(step, value) for step, value in points if step <= cut] for name, points in series.items()}


def run_metrics(series: Series) -> dict[str, float | None]:
    """A run's summary (`renio_pl.report.summarize`), the update's shape (means over rounds, see `MECHANISM`)
    and each group's final held-out accuracy (`final_group_accuracy/<group>`)."""
    metrics = summarize(series)
    for name, logged in MECHANISM.items():
        values = [value for _, value in series.get(logged, [])]
        metrics[name] = mean(values) if values else None
    for logged, points in series.items():
        if logged.startswith(GROUP_PREFIX):
            metrics["final_group_accuracy/" + logged.removeprefix(GROUP_PREFIX)] = sorted(points)[-1][1]
    return metrics


# Two-sided 95% quantiles of Student's t with `n - 1` degrees of freedom, n = 2..30 (beyond: 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]


def interval95(values: list[float]) -> float | None:
    """Half-width of the 95% interval of the mean, `t_{0.975, n-1} s / sqrt(n)` (None under two values)."""
    n = len(values)
    if n < 2:
        return None
    return (_T95[n - 2] if n <= 30 else 1.96) * stdev(values) / sqrt(n)


def aggregate(results: list[dict]) -> list[dict]:
    """Per label (in order of appearance): successful seeds, and mean, sample std and 95% interval
    (`interval95`) of each metric over them.

    A metric a run did not log is left out of its mean; std and the interval need two values (else None).
    """
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        done = [r for r in results if r["label"] == label and r["returncode"] == 0]
        row = {"label": label, "value": next(r["value"] for r in results if r["label"] == label), "seeds": len(done)}
        logged = [*METRICS, *(m for m in dict.fromkeys(k for r in done for k in r["metrics"]) if m not in METRICS
                              and m != "initial_accuracy")]
        for metric in logged:
            values = [r["metrics"][metric] for r in done if r["metrics"].get(metric) is not None]
            row[f"{metric}_mean"] = mean(values) if values else None
            row[f"{metric}_std"] = stdev(values) if len(values) > 1 else None
            row[f"{metric}_ci95"] = interval95(values)
        rows.append(row)
    return rows


def best_over(rows: list[dict], runs: list[SweepRun], param: str, metric: str = "final_accuracy") -> list[dict]:
    """For each combination of the other options, the row of the value of `param` with the highest mean `metric`.

    Returns the chosen rows, in order of first appearance, each with `best_value` (the label of
    `param`'s value chosen) and `others` (the other options' labels, joined by `,`).
    """
    options = {run.label: run.options for run in runs}
    chosen: dict[str, dict] = {}
    for row in rows:
        settings = options[row["label"]]
        others = ",".join(label for name, label, _ in settings if name != param)
        value = next(label for name, label, _ in settings if name == param)
        score = row.get(f"{metric}_mean")
        best = chosen.get(others)
        if others not in chosen or (score is not None and (best[f"{metric}_mean"] is None or score > best[f"{metric}_mean"])):
            chosen[others] = {**row, "best_value": value, "others": others}
    return list(chosen.values())


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def _cell(row: dict, metric: str, scale: float, digits: int) -> str:
    """`mean ± half-width of the 95% interval` (the mean alone with one seed; empty when not logged)."""
    mean_value, half = row.get(f"{metric}_mean"), row.get(f"{metric}_ci95")
    if mean_value is None:
        return ""
    return f"{scale * mean_value:.{digits}f}" + ("" if half is None else f" ± {scale * half:.{digits}f}")


def sweep_markdown(param: str, rows: list[dict], title: str | None = None, first: str = "value") -> str:
    """The sweep table: accuracies in %, AUROC and shares as fractions, each `mean ± 95% interval` over seeds."""
    groups = sorted({m.removesuffix("_mean") for row in rows for m in row if m.startswith("final_group_accuracy/")
                     and m.endswith("_mean")})
    columns = [("final val acc (%)", "final_accuracy", 100, 1), ("best val acc (%)", "best_accuracy", 100, 1),
               ("AUROC incorrect (last round)", "auroc_last_round", 1, 3),
               ("AUROC incorrect (mean over rounds)", "auroc_over_rounds", 1, 3),
               *((f"final acc {g.split('/', 1)[1]} (%)", g, 100, 1) for g in groups),
               ("ESS share", "ess_share", 1, 3), ("top-10% loss share", "top10_loss_share", 1, 3),
               ("grad norm", "grad_norm", 1, 3)]
    columns = [c for c in columns if any(row.get(f"{c[1]}_mean") is not None for row in rows)]
    header = [first, "seeds", *(c[0] for c in columns)]
    lines = [title or f"# Sweep over `{param}`\n", "Each cell: mean ± half-width of the 95% interval over seeds "
             "(Student's t).\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row["label"] if first == "value" else f"{row['others']} (best: {row['best_value']})"
        cells = [_cell(row, metric, scale, digits) for _, metric, scale, digits in columns]
        lines.append("| " + " | ".join([f"`{name}`", str(row["seeds"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over curves at the steps every curve has (the last value logged at a step counts)."""
    by_step = [dict(curve) for curve in curves]
    steps = set.intersection(*(set(c) for c in by_step)) if by_step else set()
    return [(step, mean(c[step] for c in by_step)) for step in sorted(steps)]


def plot_sweep(runs: list[SweepRun], results: list[dict], path: Path) -> None:
    """`val/accuracy` and the active weighter's AUROC over training, mean over each value's seeds."""
    panels = {"val/accuracy": [], "diag/active/auroc_incorrect": []}
    series = {}
    for label in dict.fromkeys(r.label for r in runs):
        logged = [read_series(find_metrics(run.folder)) for run, result in zip(runs, results)
                  if run.label == label and result["returncode"] == 0]
        for metric, names in panels.items():
            curves = [s[metric] for s in logged if metric in s]
            if curves:
                series[f"{metric} [{label}]"] = mean_curve(curves)
                names.append(f"{metric} [{label}]")
    kept = [names for names in panels.values() if names]
    if kept:
        plot_series(series, kept, path)


def write_tables(out: Path, results: list[dict], runs: list[SweepRun], names: str, best_param: str | None,
                 budget: str = "") -> str:
    """`runs.csv`, `sweep.csv` / `sweep.md` and, with `best_param`, `best.csv` / `best.md` in `out`; returns the last table."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "runs.csv", [{"label": r["label"], "value": r["value"], "seed": r["seed"],
                                   "returncode": r["returncode"], **r["metrics"]} for r in results])
    rows = aggregate(results)
    _write_csv(out / "sweep.csv", rows)
    table = sweep_markdown(names, rows, f"# Sweep over {names}{budget}\n")
    (out / "sweep.md").write_text(table)
    if best_param is not None:
        best = best_over(rows, runs, best_param)
        table = sweep_markdown(names, best, f"# Each at its best `{best_param}` (highest mean final accuracy){budget}\n",
                               first="options")
        (out / "best.md").write_text(table)
        _write_csv(out / "best.csv", best)
    return table

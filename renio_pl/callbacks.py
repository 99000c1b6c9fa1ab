"""Callbacks that any run can use: a PNG plot of held-out accuracy and weights over training."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

__all__ = ["TrainingPlot"]

log = logging.getLogger(__name__)


class TrainingPlot(pl.Callback):
    """At the end of `fit`, plots metrics from the run's `metrics.csv` into a PNG in its log folder.

    Args:
        filename: name of the PNG, written next to `metrics.csv`.
        panels: one panel per entry: metric names drawn together against the optimizer step.
    """

    def __init__(
        self,
        filename: str = "training.png",
        panels: list[list[str]] = [["val/accuracy", "rollout/accuracy"], ["weights/mean", "weights/max"]],  # noqa: B006
    ) -> None:
        self.filename = filename
        self.panels = panels

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            log.warning("TrainingPlot needs a CSVLogger among trainer.logger; no plot written")
            return
        csv_logger.save()
        metrics_file = Path(csv_logger.log_dir) / "metrics.csv"
        series = read_series(metrics_file)
        path = Path(csv_logger.log_dir) / self.filename
        plot_series(series, self.panels, path)
        log.info("training plot: %s", path)


def read_series(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """`{metric: [(step, value), ...]}` from a Lightning `metrics.csv` (blank cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    with metrics_file.open() as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    series.setdefault(name, []).append((float(row["step"]), float(value)))
    return series


def plot_series(series: dict[str, list[tuple[float, float]]], panels: list[list[str]], path: Path) -> None:
    """One panel per list of metric names, each metric a line over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for axis, names in zip(axes[0], panels):
        for name in names:
            if name in series:
                steps, values = zip(*sorted(series[name]))
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        axis.set_xlabel("optimizer step")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

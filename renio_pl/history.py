"""The run's own metric history: `history.jsonl` in the run folder, whatever logger the run uses.

`HistoryLogger` is a Lightning logger that `TrainingMonitor` and `TrainingPlot` add beside the
run's own (CSV, TensorBoard, W&B, ...), so the plot and `renio-pl-report` read one file format
for every run. Each line is one `log_metrics` call: `{"step": 12, "train/loss": 0.31, ...}`.
The file sits in the run folder: the first logger's own folder (CSV / TensorBoard:
`save_dir/name/version_<n>`; W&B: `save_dir/<project>/<run id>`), else `default_root_dir`.
"""

from __future__ import annotations

import csv
import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["HISTORY_FILE", "HistoryLogger", "run_folder", "add_history", "read_series", "Series"]

HISTORY_FILE = "history.jsonl"

Series = dict[str, list[tuple[float, float]]]


def run_folder(trainer: pl.Trainer) -> Path:
    """The folder this run's files belong in (the same on every process).

    The first logger's `log_dir` (CSV, TensorBoard), else its `save_dir/name/version` (W&B:
    the project and run id, where Lightning also puts the checkpoints), else `default_root_dir`.
    """
    folder = Path(trainer.default_root_dir)
    loggers = [lg for lg in trainer.loggers if not isinstance(lg, HistoryLogger)]
    if loggers:
        first = loggers[0]
        if getattr(first, "log_dir", None):
            folder = Path(first.log_dir)
        else:
            version = first.version if isinstance(first.version, str) else f"version_{first.version}"
            folder = Path(first.save_dir or trainer.default_root_dir) / str(first.name or "") / version
    return Path(trainer.strategy.broadcast(str(folder)))


class HistoryLogger(Logger):
    """Appends every logged metric to `<folder>/history.jsonl` (rank 0 only).

    Args:
        folder: the run folder (`run_folder(trainer)`).
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / HISTORY_FILE

    # Blank name and version, and the run folder as save_dir: when it is the only logger
    # (`trainer.logger: false`), the folder is `default_root_dir`, so checkpoints and
    # `trainer.log_dir` stay where they would be without a logger.
    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.folder)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            record[name] = value if math.isfinite(value) else str(value)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are in the run's config.yaml; nothing to add here."""


def add_history(trainer: pl.Trainer) -> HistoryLogger:
    """The trainer's `HistoryLogger`, added to `trainer.loggers` if it has none yet."""
    for logger in trainer.loggers:
        if isinstance(logger, HistoryLogger):
            return logger
    history = HistoryLogger(run_folder(trainer))
    trainer.loggers = [*trainer.loggers, history]
    return history


def read_series(path: Path) -> Series:
    """`{metric: [(step, value), ...]}` sorted by step, from a `history.jsonl` or a Lightning `metrics.csv`.

    A metric logged twice at one step (a resumed run that logged into the same file) keeps
    the later value; blank cells and non-finite values are skipped.
    """
    latest: dict[str, dict[float, float]] = {}

    def add(name: str, step: Any, value: Any) -> None:
        if name == "step" or value in ("", None) or step in ("", None):
            return
        value = float(value)
        if math.isfinite(value):
            latest.setdefault(name, {})[float(step)] = value

    with path.open() as f:
        if path.suffix == ".csv":
            for row in csv.DictReader(f):
                for name, value in row.items():
                    add(name, row.get("step"), value)
        else:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    for name, value in record.items():
                        if not isinstance(value, str):
                            add(name, record.get("step"), value)
    return {name: sorted(points.items()) for name, points in latest.items()}

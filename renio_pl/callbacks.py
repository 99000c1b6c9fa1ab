"""Callbacks that any run can use: a PNG plot of training, and evaluation reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist

from renio_pl.history import Series, add_history, read_series

__all__ = ["TrainingPlot", "EvaluationReport", "read_series", "plot_series"]

log = logging.getLogger(__name__)


class TrainingPlot(pl.Callback):
    """At the end of `fit`, plots the run's logged history into a PNG in the run folder.

    Reads `history.jsonl` (`renio_pl.history`), which is written whatever the run's logger
    (CSV, TensorBoard, W&B), so the plot needs no particular one. A fit that logged nothing
    (a finished run started again) writes no plot and says so.

    Args:
        filename: name of the PNG, written next to `history.jsonl`.
        panels: one panel per entry: metric names drawn together against the optimizer step
            (names the run did not log are left out, and so is a panel with none).
    """

    def __init__(
        self,
        filename: str = "training.png",
        panels: list[list[str]] = [  # noqa: B006
            ["val/accuracy", "rollout/accuracy"], ["train/loss", "train/kl"], ["weights/max", "weights/kept_share"]
        ],
    ) -> None:
        self.filename = filename
        self.panels = panels
        self.history_file: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.history_file = add_history(trainer).path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.history_file is None:
            return
        series = read_series(self.history_file) if self.history_file.is_file() else {}
        panels = [names for names in self.panels if any(name in series for name in names)]
        if not panels:
            log.info("TrainingPlot: this fit logged none of %s; no plot written", sorted({n for p in self.panels for n in p}))
            return
        path = self.history_file.parent / self.filename
        plot_series(series, panels, path)
        log.info("training plot: %s", path)


def plot_series(series: Series, panels: list[list[str]], path: Path) -> None:
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


class EvaluationReport(pl.Callback):
    """Writes what `test` and `predict` sampled: per-benchmark JSON and a markdown table.

    `test` writes `<folder>/<benchmark>.json` (the metrics, then every problem with its
    samples: completion, extracted answer, verdict) and `<folder>/results.md`, and prints
    the table; `predict` writes `<folder>/<benchmark>.predictions.jsonl`, one sample a line.
    Records from every process are gathered to rank 0 first.

    Args:
        folder: where to write; default `<the logger's run folder>/eval`.
    """

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.records: dict[int, list[dict]] = {}

    def _collect(self, outputs: list[dict], dataloader_idx: int) -> None:
        self.records.setdefault(dataloader_idx, []).extend(outputs)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records = {}

    on_predict_epoch_start = on_test_epoch_start

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_set, folder = self._gather(trainer), self._folder(trainer)  # collectives: every rank
        if not trainer.is_global_zero:
            return
        rows = []
        for name, records in per_set.items():
            metrics = {
                key.removeprefix(f"test/{name}/"): float(value)
                for key, value in trainer.callback_metrics.items()
                if key.startswith(f"test/{name}/")
            }
            problems = group_by_problem(records)
            report = {"benchmark": name, "metrics": metrics, "problems": problems}
            (folder / f"{name}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
            tokens = [r["completion_tokens"] for r in records]
            rows.append((name, len(problems), metrics, sum(tokens) / max(1, len(tokens))))
        table = results_table(rows)
        (folder / "results.md").write_text(table)
        print(f"\n{table}\nreport: {folder}")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_set, folder = self._gather(trainer), self._folder(trainer)  # collectives: every rank
        if not trainer.is_global_zero:
            return
        for name, records in per_set.items():
            path = folder / f"{name}.predictions.jsonl"
            ordered = sorted(records, key=lambda r: (r["problem"], r["sample"]))
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
            print(f"{name}: {len(ordered)} completions -> {path}")

    def _gather(self, trainer: pl.Trainer) -> dict[str, list[dict]]:
        """Every process's records, by benchmark name (on every rank)."""
        names = [eval_set.name for eval_set in trainer.datamodule.test_sets]
        local = {names[i]: records for i, records in self.records.items()}
        if not (dist.is_available() and dist.is_initialized()):
            return {name: local.get(name, []) for name in names}
        everyone: list[dict[str, list[dict]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, local)
        return {name: [r for part in everyone for r in part.get(name, [])] for name in names}

    def _folder(self, trainer: pl.Trainer) -> Path:
        """The report folder (created on rank 0); `trainer.log_dir` broadcasts, so every rank calls this."""
        folder = Path(self.folder) if self.folder else Path(trainer.log_dir or trainer.default_root_dir) / "eval"
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
        return folder


def group_by_problem(records: list[dict]) -> list[dict]:
    """Sample records -> one entry per problem (by index) with its samples in order."""
    problems: dict[int, dict] = {}
    for record in sorted(records, key=lambda r: (r["problem"], r["sample"])):
        entry = problems.setdefault(
            record["problem"], {"problem": record["problem"], "answer": record["answer"], "correct": 0, "samples": []}
        )
        entry["correct"] += bool(record["correct"])
        entry["samples"].append({k: v for k, v in record.items() if k not in ("problem", "answer")})
    return list(problems.values())


def results_table(rows: list[tuple[str, int, dict[str, float], float]]) -> str:
    """A markdown table: benchmark, problems, each metric (as %), mean completion tokens."""
    metric_names = sorted({m for _, _, metrics, _ in rows for m in metrics}, key=lambda m: (m.split("@")[0], m))
    header = ["benchmark", "problems", *metric_names, "mean tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, problems, metrics, mean_tokens in rows:
        cells = [f"{100 * metrics[m]:.2f}" if m in metrics else "" for m in metric_names]
        lines.append("| " + " | ".join([name, str(problems), *cells, f"{mean_tokens:.0f}"]) + " |")
    return "\n".join(lines) + "\n"

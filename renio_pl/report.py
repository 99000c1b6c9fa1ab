"""`renio-pl-report RUN_DIR [--out DIR]`: a run's logged metrics as PNG figures and a markdown summary.

Reads the run's logged history: `history.jsonl`, which `renio-pl` writes beside whatever
logger the run uses (CSV, TensorBoard, W&B), or else a CSVLogger's `metrics.csv`: the newest
one under RUN_DIR, or RUN_DIR itself when it is the file. Writes into `--out` (default
`RUN_DIR/report`):

    weights_vs_correctness.png  per round: AUROC of each weighter's weight for an incorrect
                                rollout, and each weighter's mean weight of correct vs
                                incorrect rollouts (the paper's Figure 5)
    length_markers.png          generated tokens and epistemic markers per rollout, correct
                                vs incorrect (Figures 7 and 8)
    markers.png                 each epistemic marker, correct vs incorrect
    accuracy.png                held-out accuracy (`val/accuracy`) and training-rollout accuracy
    summary.md                  the numbers behind them

The `diag/*` metrics come from `renio_pl.diagnostics`; a figure whose metrics a run did not
log is left out. Bad input (no such folder, no logged history, nothing to plot) is one line,
`error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from statistics import mean
from typing import NoReturn

from renio_pl.callbacks import plot_series
from renio_pl.errors import ConfigError
from renio_pl.history import HISTORY_FILE, Series, read_series

__all__ = ["find_history", "find_metrics", "summarize", "summary_markdown", "write_report", "main"]

log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse that prints a bad command line as one line, `error: ...`, and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see --help)\n")
        self.exit(2)


LOG_FILES = (HISTORY_FILE, "metrics.csv")  # in order of preference


def find_history(run_dir: Path) -> Path:
    """The run's logged history: `run_dir` itself, or the newest `history.jsonl` (else `metrics.csv`) under it.

    A run resumed by Lightning may log into a new `version_<n>` folder of the same logger;
    the files of different loggers' folders (a sweep, a folder of runs) are ambiguous and an error.
    """
    if not run_dir.exists():
        raise ConfigError(f"run folder {run_dir} does not exist")
    if run_dir.is_file():
        if run_dir.name not in LOG_FILES:
            raise ConfigError(f"{run_dir} is neither a history.jsonl nor a metrics.csv; give the run's folder")
        return run_dir
    for name in LOG_FILES:
        found = sorted(run_dir.rglob(name), key=lambda p: p.stat().st_mtime)
        if found:
            break
    else:
        raise ConfigError(
            f"no history.jsonl or metrics.csv under {run_dir}; give the folder of a run made with renio-pl "
            "(or with renio_pl.callbacks.TrainingPlot or a CSVLogger)"
        )
    if len({p.parent.parent for p in found}) > 1:
        raise ConfigError(
            f"{len(found)} runs' {found[0].name} under {run_dir} (e.g. {found[0]} and {found[-1]}); give one run's folder"
        )
    if len(found) > 1:
        log.info("%d versions of %s under %s (a resumed run); reporting the newest", len(found), found[0].name, run_dir)
    return found[-1]


find_metrics = find_history  # the name earlier releases used


def weighter_names(series: Series) -> list[str]:
    """Weighters with diagnostics in the run: `active` first, then the others in name order."""
    names = {m.split("/")[1] for m in series if re.fullmatch(r"diag/[\w-]+/(auroc_incorrect|weight_correct)", m)}
    return sorted(names, key=lambda name: (name != "active", name))


def marker_names(series: Series) -> list[str]:
    """Epistemic markers counted in the run (as logged: spaces as `_`)."""
    return sorted({m.removeprefix("diag/marker/").rpartition("_")[0] for m in series if m.startswith("diag/marker/")})


def _last(series: Series, name: str) -> float | None:
    return max(series[name])[1] if series.get(name) else None


def _mean(series: Series, name: str) -> float | None:
    return mean(value for _, value in series[name]) if series.get(name) else None


def summarize(series: Series) -> dict[str, float | None]:
    """Headline numbers of a run (None when not logged).

    `initial_accuracy` / `final_accuracy` / `best_accuracy`: `val/accuracy` at its first and
    last step and its maximum; `auroc_last_round` / `auroc_over_rounds`: `diag/active/auroc_incorrect` in the
    last round and its mean over rounds.
    """
    accuracy = sorted(series.get("val/accuracy", []))
    return {
        "initial_accuracy": accuracy[0][1] if accuracy else None,
        "final_accuracy": accuracy[-1][1] if accuracy else None,
        "best_accuracy": max(value for _, value in accuracy) if accuracy else None,
        "auroc_last_round": _last(series, "diag/active/auroc_incorrect"),
        "auroc_over_rounds": _mean(series, "diag/active/auroc_incorrect"),
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def summary_markdown(series: Series, source: Path) -> str:
    """The run's summary: held-out accuracy, then weight vs correctness per weighter, then lengths and markers."""
    headline = summarize(series)
    lines = [f"# Run report\n\nFrom `{source}`.\n", "## Held-out accuracy (`val/accuracy`)\n"]
    if headline["final_accuracy"] is None:
        lines.append("Not logged (the run has no `data.val_path`).\n")
    else:
        lines += _table(["first", "last", "best"], [[_cell(headline[k]) for k in ("initial_accuracy", "final_accuracy",
                                                                                  "best_accuracy")]])
        lines.append("")
    lines.append("## Weight vs correctness, per round (`active`: the weights trained with)\n")
    lines.append("`last`: the last round that logged the value; `mean`: over the rounds that did.\n")
    weighters = weighter_names(series)
    if weighters:
        rows = [
            [w, _cell(_last(series, f"diag/{w}/auroc_incorrect")), _cell(_mean(series, f"diag/{w}/auroc_incorrect")),
             _cell(_last(series, f"diag/{w}/weight_correct")), _cell(_last(series, f"diag/{w}/weight_incorrect"))]
            for w in weighters
        ]
        header = ["weighter", "AUROC incorrect (last)", "AUROC incorrect (mean)", "weight correct (last)",
                  "weight incorrect (last)"]
        lines += [*_table(header, rows), ""]
    else:
        lines.append("No `diag/*` metrics: the rollouts had no labels, or `model.diagnostics` was null.\n")
    quantities = [("generated tokens", "diag/len"), ("markers (all)", "diag/markers")]
    quantities += [(f"marker `{m}`", f"diag/marker/{m}") for m in marker_names(series)]
    rows = [
        [label, *(_cell(f(series, f"{stem}_{part}"), 2) for f in (_last, _mean) for part in ("correct", "incorrect"))]
        for label, stem in quantities
        if f"{stem}_correct" in series or f"{stem}_incorrect" in series
    ]
    if rows:
        lines.append("## Per rollout, correct vs incorrect\n")
        header = ["quantity", "correct (last)", "incorrect (last)", "correct (mean)", "incorrect (mean)"]
        lines += [*_table(header, rows), ""]
    return "\n".join(lines)


def figures(series: Series) -> dict[str, list[list[str]]]:
    """Each figure's file name and panels (lists of metric names drawn together), for the metrics the run has."""
    weighters, markers = weighter_names(series), marker_names(series)
    panels = {
        "weights_vs_correctness.png": [[f"diag/{w}/auroc_incorrect" for w in weighters]]
        + [[f"diag/{w}/weight_correct", f"diag/{w}/weight_incorrect"] for w in weighters],
        "length_markers.png": [["diag/len_correct", "diag/len_incorrect"],
                               ["diag/markers_correct", "diag/markers_incorrect"]],
        "markers.png": [[f"diag/marker/{m}_correct", f"diag/marker/{m}_incorrect"] for m in markers],
        "accuracy.png": [["val/accuracy"], ["rollout/accuracy"]],
    }
    kept = {}
    for filename, figure_panels in panels.items():
        figure_panels = [names for names in figure_panels if any(name in series for name in names)]
        if figure_panels:
            kept[filename] = figure_panels
    return kept


def write_report(metrics_file: Path, out: Path) -> list[Path]:
    """Write the figures and `summary.md` for one `history.jsonl` or `metrics.csv` into `out`; returns the files."""
    series = read_series(metrics_file)
    panels = figures(series)
    if not panels:
        raise ConfigError(f"{metrics_file} has neither val/accuracy nor diag/* metrics: nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, figure_panels in panels.items():
        plot_series(series, figure_panels, out / filename)
        written.append(out / filename)
    (out / "summary.md").write_text(summary_markdown(series, metrics_file))
    return [*written, out / "summary.md"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-report`."""
    parser = OneLineParser(prog="renio-pl-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's folder (or its history.jsonl or metrics.csv)")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        metrics_file = find_history(args.run_dir)
        out = args.out or (args.run_dir.parent if args.run_dir.is_file() else args.run_dir) / "report"
        for path in write_report(metrics_file, out):
            log.info("wrote %s", path)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

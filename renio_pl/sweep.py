"""`renio-pl-sweep`: one option over several values and seeds, each value and seed a `renio-pl fit` process.

    renio-pl-sweep --config configs/demo.yaml --param model.weighter.init_args.threshold \\
        --values 0.4 0.8 1.2 --seeds 0 1 2 --out runs/sweep [-- MORE FIT OPTIONS]

A value is anything `renio-pl fit --<param>` takes: a number, a class name, or a YAML / JSON
mapping (`'{class_path: OracleWeighter, init_args: {mode: incorrect_only}}'`); write
`label=value` to name it in the tables (otherwise the value is its label). The run of a
value and seed trains in `OUT/<label>/seed<seed>` with `--seed_everything <seed>
--data.seed <seed>` (the data seed keys prompt order and sampling) and logs there with a
CSVLogger. Every command is parsed (`--print_config`) before any run starts, so a typo stops
the sweep at once: one line, `error: ...`, exit status 2. A run whose `result.json` records
the same command is not run again, so an interrupted sweep continues where it stopped.

Writes `OUT/runs.csv` (one row per run), `OUT/sweep.csv` and `OUT/sweep.md` (mean and
sample std over seeds per value of the final and best `val/accuracy` and of the active
weighter's AUROC for an incorrect rollout; see `renio_pl.report.summarize`) and
`OUT/sweep.png` (`val/accuracy` and that AUROC over training, mean over seeds). Exit
status 1 when a run failed (its log is `OUT/<label>/seed<seed>/fit.log`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from renio_pl.callbacks import plot_series, read_series
from renio_pl.errors import ConfigError
from renio_pl.report import OneLineParser, find_metrics, summarize

__all__ = ["SweepRun", "sweep_runs", "aggregate", "main"]

log = logging.getLogger(__name__)

SWEPT_BY_THE_SWEEP = ("seed_everything", "data.seed", "trainer.default_root_dir", "trainer.logger")
METRICS = ("final_accuracy", "best_accuracy", "auroc_last_round", "auroc_over_rounds")


@dataclass
class SweepRun:
    """One `renio-pl fit` of the sweep: a value of the option, a seed, and its folder."""

    label: str
    value: str
    seed: int
    folder: Path

    def fit_args(self, config: Path, param: str, extra: list[str]) -> list[str]:
        """The `renio-pl` arguments of this run."""
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(self.folder), "name": ""}
        }
        return [
            "fit", "--config", str(config), *extra, f"--{param}", self.value,
            "--seed_everything", str(self.seed), "--data.seed", str(self.seed),
            "--trainer.default_root_dir", str(self.folder), "--trainer.logger", json.dumps(logger),
        ]


def _labelled(value: str) -> tuple[str, str]:
    """(label, value) from `label=value`, or the value as its own label."""
    named = re.match(r"([\w.-]+)=(.+)", value, re.S)
    return (named.group(1), named.group(2)) if named else (" ".join(value.split()), value)


def sweep_runs(param: str, values: list[str], seeds: list[int], out: Path) -> list[SweepRun]:
    """One run per (value, seed), value-major."""
    if any(param == name or param.startswith(name + ".") for name in SWEPT_BY_THE_SWEEP):
        raise ConfigError(
            f"--param {param}: the sweep sets {', '.join(SWEPT_BY_THE_SWEEP)} itself; sweep --seeds instead"
        )
    labelled = [_labelled(v) for v in values]
    labels = [label for label, _ in labelled]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--values: labels must differ; got {labels}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must differ; got {seeds}")
    return [
        SweepRun(label, value, seed, out / re.sub(r"[^\w.=-]+", "_", label) / f"seed{seed}")
        for label, value in labelled
        for seed in seeds
    ]


def check_command(args: list[str]) -> None:
    """Parse a `renio-pl` command without running it; its one-line error becomes a `ConfigError`."""
    from renio_pl.cli import main as cli_main

    stderr, argv = io.StringIO(), sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when it sees the sweep's own arguments there too
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            cli_main([*args, "--print_config"])
    except SystemExit as done:
        if done.code not in (0, None):
            lines = stderr.getvalue().strip().splitlines() or [f"exit status {done.code}"]
            raise ConfigError(lines[-1].removeprefix("error: ")) from None
    finally:
        sys.argv = argv


def run_fit(run: SweepRun, args: list[str]) -> dict:
    """Run `renio-pl fit` in a subprocess (or reuse the result of the same command); returns its `result.json`."""
    result_file = run.folder / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result["command"] == args and result["returncode"] == 0:
            return result
    run.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run.folder / "fit.log").open("w") as fit_log:
        done = subprocess.run([sys.executable, "-m", "renio_pl.cli", *args], stdout=fit_log, stderr=subprocess.STDOUT)
    result = {"label": run.label, "value": run.value, "seed": run.seed, "command": args, "returncode": done.returncode,
              "seconds": round(time.perf_counter() - start, 1), "metrics": {}}
    if done.returncode == 0:
        result["metrics"] = summarize(read_series(find_metrics(run.folder)))
    result_file.write_text(json.dumps(result, indent=1))
    return result


def aggregate(results: list[dict]) -> list[dict]:
    """Per label (in order of appearance): successful seeds, and mean and sample std of each metric over them.

    A metric a run did not log is left out of its mean; std needs two values (else None).
    """
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        done = [r for r in results if r["label"] == label and r["returncode"] == 0]
        row = {"label": label, "value": next(r["value"] for r in results if r["label"] == label), "seeds": len(done)}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in done if r["metrics"].get(metric) is not None]
            row[f"{metric}_mean"] = mean(values) if values else None
            row[f"{metric}_std"] = stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def sweep_markdown(param: str, rows: list[dict]) -> str:
    """The sweep table: accuracies in %, AUROC as a fraction, each `mean ± std` over seeds."""

    def cell(row: dict, metric: str, scale: float, digits: int) -> str:
        mean_value, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        if mean_value is None:
            return ""
        return f"{scale * mean_value:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")

    header = ["value", "seeds", "final val acc (%)", "best val acc (%)", "AUROC incorrect (last round)",
              "AUROC incorrect (mean over rounds)"]
    lines = [f"# Sweep over `{param}`\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell(row, "final_accuracy", 100, 1), cell(row, "best_accuracy", 100, 1),
                 cell(row, "auroc_last_round", 1, 3), cell(row, "auroc_over_rounds", 1, 3)]
        lines.append("| " + " | ".join([f"`{row['label']}`", str(row["seeds"]), *cells]) + " |")
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-sweep`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(prog="renio-pl-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the renio-pl fit config every run starts from")
    parser.add_argument("--param", required=True, help="the option to sweep, e.g. model.weighter.init_args.threshold")
    parser.add_argument("--values", nargs="+", required=True, help="its values, each `value` or `label=value`")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each value (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder")
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config} is not a file")
        runs = sweep_runs(args.param, args.values, args.seeds, args.out)
        commands = [run.fit_args(args.config, args.param, extra) for run in runs]
        for run, command in zip(runs, commands):
            try:
                check_command(command)
            except ConfigError as error:
                raise ConfigError(f"value {run.value!r} of --param {args.param}: {error}") from None
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    results = []
    for i, (run, command) in enumerate(zip(runs, commands), 1):
        result = run_fit(run, command)
        failed = f"FAILED (exit {result['returncode']}, see {run.folder / 'fit.log'})"
        outcome = "done" if result["returncode"] == 0 else failed
        log.info("[%d/%d] %s seed %d: %s in %.0f s %s", i, len(runs), run.label, run.seed, outcome, result["seconds"],
                 {k: v for k, v in result["metrics"].items() if v is not None})
        results.append(result)
    _write_csv(args.out / "runs.csv", [{"label": r["label"], "value": r["value"], "seed": r["seed"],
                                        "returncode": r["returncode"], **{m: r["metrics"].get(m) for m in METRICS}}
                                       for r in results])
    rows = aggregate(results)
    _write_csv(args.out / "sweep.csv", rows)
    (args.out / "sweep.md").write_text(sweep_markdown(args.param, rows))
    plot_sweep(runs, results, args.out / "sweep.png")
    log.info("\n%s\nsweep: %s", sweep_markdown(args.param, rows), args.out)
    if any(r["returncode"] != 0 for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

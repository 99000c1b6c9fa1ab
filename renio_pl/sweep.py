"""`renio-pl-sweep`: options over several values and seeds, each combination and seed a `renio-pl fit` process.

    renio-pl-sweep --config configs/demo.yaml --param model.weighter.init_args.threshold \\
        --values 0.4 0.8 1.2 --seeds 0 1 2 --out runs/sweep [-- MORE FIT OPTIONS]

A grid: repeat `--param ... --values ...`; every combination of the values runs, and
`--best-over PARAM` (usually the learning rate) adds a table that gives each combination of
the other options at its own best value of PARAM (the highest mean final accuracy), the same
grid for every method:

    renio-pl-sweep --config configs/demo.yaml \\
        --param model.weighter --values uniform=UniformWeighter renio=ReNIOWeighter \\
        --param model.optimizer.init_args.lr --values 1e-4 3e-4 \\
        --best-over model.optimizer.init_args.lr --seeds 0 1 2 3 4 --out runs/grid

A value is anything `renio-pl fit --<param>` takes: a number, a class name, or a YAML / JSON
mapping (`'{class_path: OracleWeighter, init_args: {mode: incorrect_only}}'`); write
`label=value` to name it in the tables (otherwise the value is its label). The run of a
combination and seed trains in `OUT/<label>/.../seed<seed>` (one folder level per option)
with `--seed_everything <seed> --data.seed <seed>` (the data seed keys prompt order and
sampling) and logs there with a CSVLogger. Every command is parsed (`--print_config`) before
any run starts, so a typo stops the sweep at once: one line, `error: ...`, exit status 2. A
run whose `result.json` records the same command is not run again, so an interrupted sweep
continues where it stopped.

`--at-epochs N [N ...]` also tabulates every run as it stood after its first N epochs
(rounds): a shorter budget read from the same runs, written to `OUT/epochs<N>/`. This equals
a run with `--trainer.max_epochs N` only when nothing in the first N epochs depends on the
run's length: true of a warm-up then a constant learning rate (the demos), not of a schedule
stretched over the whole run.

Writes `OUT/runs.csv` (one row per run), `OUT/sweep.csv` and `OUT/sweep.md` (per
combination: the mean, sample std and 95% interval over seeds (Student's t) of the final and
best `val/accuracy`, the active weighter's AUROC for an incorrect rollout
(`renio_pl.report.summarize`), and the update's shape: the weights' effective sample share,
the loss share of the top 10% of rollouts and the gradient norm, means over rounds, and the
final held-out accuracy of each problem group (`renio_pl.diagnostics`)), `OUT/best.md` with
`--best-over`, and `OUT/sweep.png` (`val/accuracy` and that AUROC over training, mean over
seeds). Exit status 1 when a run failed (its log is `OUT/<label>/.../seed<seed>/fit.log`).
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
from itertools import product
from math import sqrt
from statistics import mean, stdev

from renio_pl.callbacks import plot_series, read_series
from renio_pl.errors import ConfigError
from renio_pl.history import Series
from renio_pl.report import OneLineParser, find_metrics, summarize

__all__ = ["SweepRun", "sweep_runs", "aggregate", "interval95", "best_over", "first_epochs", "run_metrics", "main"]

log = logging.getLogger(__name__)

SWEPT_BY_THE_SWEEP = ("seed_everything", "data.seed", "trainer.default_root_dir", "trainer.logger")
METRICS = ("final_accuracy", "best_accuracy", "auroc_last_round", "auroc_over_rounds")
MECHANISM = {  # summary name -> the diagnostic averaged over rounds
    "ess_share": "diag/active/ess_share", "top10_loss_share": "diag/active/top10_loss_share", "grad_norm": "diag/grad_norm",
}
GROUP_PREFIX = "val/group_accuracy/"


@dataclass
class SweepRun:
    """One `renio-pl fit` of the sweep: a value of each option, a seed, and its folder.

    `label` and `value` join the options' labels (`,`) and values (` | `); `options` holds
    `(param, label, value)` per swept option.
    """

    label: str
    value: str
    seed: int
    folder: Path
    options: tuple[tuple[str, str, str], ...] = ()

    def fit_args(self, config: Path, extra: list[str]) -> list[str]:
        """The `renio-pl` arguments of this run."""
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(self.folder), "name": ""}
        }
        settings = [arg for param, _, value in self.options for arg in (f"--{param}", value)]
        return [
            "fit", "--config", str(config), *extra, *settings,
            "--seed_everything", str(self.seed), "--data.seed", str(self.seed),
            "--trainer.default_root_dir", str(self.folder), "--trainer.logger", json.dumps(logger),
        ]


def _labelled(value: str) -> tuple[str, str]:
    """(label, value) from `label=value`, or the value as its own label."""
    named = re.match(r"([\w.-]+)=(.+)", value, re.S)
    return (named.group(1), named.group(2)) if named else (" ".join(value.split()), value)


def sweep_runs(
    params: str | list[str], values: list[str] | list[list[str]], seeds: list[int], out: Path
) -> list[SweepRun]:
    """One run per (combination of values, seed), in the order of the options then the seeds.

    Args:
        params: the option, or the options of a grid.
        values: its values, or one list of values per option.
    """
    if isinstance(params, str):
        params, values = [params], [values]
    if len(params) != len(values):
        raise ConfigError(f"give one --values after each --param; got {len(params)} --param and {len(values)} --values")
    if len(set(params)) != len(params):
        raise ConfigError(f"--param: options must differ; got {params}")
    grid = []
    for param, option_values in zip(params, values):
        if any(param == name or param.startswith(name + ".") for name in SWEPT_BY_THE_SWEEP):
            raise ConfigError(
                f"--param {param}: the sweep sets {', '.join(SWEPT_BY_THE_SWEEP)} itself; sweep --seeds instead"
            )
        labelled = [_labelled(v) for v in option_values]
        labels = [label for label, _ in labelled]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--values of {param}: labels must differ; got {labels}")
        grid.append([(param, label, value) for label, value in labelled])
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must differ; got {seeds}")
    runs = []
    for options in product(*grid):
        folder = out.joinpath(*(re.sub(r"[^\w.=-]+", "_", label) for _, label, _ in options))
        label, value = ",".join(o[1] for o in options), " | ".join(o[2] for o in options)
        runs += [SweepRun(label, value, seed, folder / f"seed{seed}", tuple(options)) for seed in seeds]
    return runs


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


def run_fit(run: SweepRun, args: list[str], at_epochs: list[int] | tuple[int, ...] = ()) -> dict:
    """Run `renio-pl fit` in a subprocess (or reuse the result of the same command); returns its `result.json`.

    `metrics` summarises the whole run (`run_metrics`) and `metrics_at_epochs[str(N)]` its first
    N epochs (`first_epochs`; empty when the run has fewer); both are read from the run's logs
    again when a finished run is reused.
    """
    result_file = run.folder / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is None or result["command"] != args or result["returncode"] != 0:
        run.folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with (run.folder / "fit.log").open("w") as fit_log:
            done = subprocess.run([sys.executable, "-m", "renio_pl.cli", *args], stdout=fit_log, stderr=subprocess.STDOUT)
        result = {"label": run.label, "value": run.value, "seed": run.seed, "command": args,
                  "returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
    result["metrics"], result["metrics_at_epochs"] = {}, {}
    if result["returncode"] == 0:
        series = read_series(find_metrics(run.folder))
        result["metrics"] = run_metrics(series)
        for epochs in at_epochs:
            shorter = first_epochs(series, epochs)
            result["metrics_at_epochs"][str(epochs)] = {} if shorter is None else run_metrics(shorter)
    result_file.write_text(json.dumps(result, indent=1))
    return result


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of `renio-pl-sweep`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(prog="renio-pl-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the renio-pl fit config every run starts from")
    parser.add_argument("--param", required=True, action="append",
                        help="an option to sweep, e.g. model.weighter.init_args.threshold (repeat for a grid)")
    parser.add_argument("--values", nargs="+", required=True, action="append",
                        help="its values, each `value` or `label=value` (one --values after each --param)")
    parser.add_argument("--best-over", help="one of the --param options (e.g. the learning rate): also tabulate each "
                        "combination of the others at its best value of it (highest mean final accuracy)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each value (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder")
    parser.add_argument("--at-epochs", nargs="+", type=int, default=[], metavar="N",
                        help="also tabulate each run after its first N epochs (a shorter budget of the same runs; "
                        "valid when the learning-rate schedule does not depend on the run's length)")
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config} is not a file")
        runs = sweep_runs(args.param, args.values, args.seeds, args.out)
        if any(epochs < 1 for epochs in args.at_epochs):
            raise ConfigError(f"--at-epochs must be positive epoch counts; got {args.at_epochs}")
        if args.best_over is not None and args.best_over not in args.param:
            raise ConfigError(f"--best-over {args.best_over} must be one of the --param options ({', '.join(args.param)})")
        commands = [run.fit_args(args.config, extra) for run in runs]
        for run, command in zip(runs, commands):
            try:
                check_command(command)
            except ConfigError as error:
                raise ConfigError(f"value {run.value!r} of --param {', '.join(args.param)}: {error}") from None
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    results = []
    for i, (run, command) in enumerate(zip(runs, commands), 1):
        result = run_fit(run, command, args.at_epochs)
        failed = f"FAILED (exit {result['returncode']}, see {run.folder / 'fit.log'})"
        outcome = "done" if result["returncode"] == 0 else failed
        log.info("[%d/%d] %s seed %d: %s in %.0f s %s", i, len(runs), run.label, run.seed, outcome, result["seconds"],
                 {k: v for k, v in result["metrics"].items() if v is not None})
        results.append(result)
    names = ", ".join(f"`{p}`" for p in args.param)
    table = write_tables(args.out, results, runs, names, args.best_over)
    for epochs in args.at_epochs:
        shorter = [{**r, "metrics": r["metrics_at_epochs"].get(str(epochs), {})} for r in results]
        unfinished = [f"{r['label']} seed {r['seed']}" for r in shorter if r["returncode"] == 0 and not r["metrics"]]
        if unfinished:
            log.warning("--at-epochs %d: left out runs with fewer epochs: %s", epochs, ", ".join(unfinished))
            # counted as not done (not dropped), so runs.csv still lists them and a label keeps its row
            shorter = [{**r, "returncode": r["returncode"] or 1} if not r["metrics"] else r for r in shorter]
        write_tables(args.out / f"epochs{epochs}", shorter, runs, names, args.best_over, f", after {epochs} epoch{'s' * (epochs != 1)}")
    plot_sweep(runs, results, args.out / "sweep.png")
    log.info("\n%s\nsweep: %s", table, args.out)
    if any(r["returncode"] != 0 for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

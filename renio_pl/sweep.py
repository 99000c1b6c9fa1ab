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
seeds; `renio_pl.sweep_tables` makes them). Exit status 1 when a run failed (its log is
`OUT/<label>/.../seed<seed>/fit.log`).
"""

from __future__ import annotations

import contextlib
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

from renio_pl.callbacks import read_series
from renio_pl.errors import ConfigError
from renio_pl.report import OneLineParser, find_metrics
from renio_pl.sweep_tables import first_epochs, plot_sweep, run_metrics, write_tables

__all__ = ["SweepRun", "sweep_runs", "check_command", "run_fit", "main"]

log = logging.getLogger(__name__)

SWEPT_BY_THE_SWEEP = ("seed_everything", "data.seed", "trainer.default_root_dir", "trainer.logger")


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

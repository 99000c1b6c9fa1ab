"""Every method of the suite on the embedded demo, over seeds: the weighters, TRD and REDI.

Runs (each step skips what a previous, identical run already finished):
1. `renio-pl-sweep` of `model.weighter` on `configs/demo.yaml`: uniform, oracle incorrect-only,
   oracle correct-only, length, entropy and ReNIO weighting (30 rounds of 128 prompts x 4);
2. `renio-pl-sweep` of TRD on `configs/demo_trd.yaml` (refined every round, 30 rounds);
3. REDI per seed: `renio-pl-redi-traces` (the seed keys the teacher's samples), then
   `renio-pl-redi fit` with `configs/demo_redi_sft.yaml` and `configs/demo_redi.yaml`, their
   paths and seeds rewritten for the seed's folder.

Writes into `--report`: `tables.md` (held-out accuracy, mean ± sample std over seeds, and the
AUROC for an incorrect rollout of each diagnostic weighter, on the same rollouts) and
`accuracy.png` (held-out accuracy over the training steps of the on-policy methods, mean over
seeds; REDI's stages count steps of their own), `weighters_sweep.png` (the weighter sweep's
plot) and `renio_seed0/` (`renio-pl-report` of ReNIO's seed-0 run). `demo_assets/` must exist
(`renio-pl-demo --assets-only`). About 45 minutes on 2 CPU cores for 3 seeds.

    python evaluation/demo_comparison.py --out runs/demo_comparison --report evaluation/reports/demo_comparison

`--mechanism SWEEP_FOLDER LABEL... --figure PATH` instead draws the mechanism figure of runs
that a `renio-pl-sweep` (a grid too) left in SWEEP_FOLDER: per method (the runs under
`SWEEP_FOLDER/<LABEL>`, every seed), held-out accuracy on carry and carry-free problems, the
weights' effective sample share, the loss share of the top 10% of rollouts and the gradient
norm over training, mean over seeds (`renio_pl.diagnostics`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import yaml

from renio_pl.callbacks import plot_series, read_series
from renio_pl.report import find_metrics, summarize
from renio_pl.sweep_tables import mean_curve

REPO = Path(__file__).resolve().parents[1]
WEIGHTERS = [
    "uniform=UniformWeighter",
    "incorrect_only={class_path: OracleWeighter, init_args: {mode: incorrect_only}}",
    "correct_only={class_path: OracleWeighter, init_args: {mode: correct_only}}",
    "length=LengthWeighter",
    "entropy=EntropyWeighter",
    "renio=ReNIOWeighter",
]
DIAGNOSTIC = ["uniform", "length", "entropy", "renio"]  # renio_pl.diagnostics.standard_weighters


def run(command: list[str], log: Path | None = None) -> None:
    """Run a command from the repository root (its output to `log` when given); stop when it fails."""
    print("$", " ".join(command), flush=True)
    if log is None:
        done = subprocess.run(command, cwd=REPO)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"error: `{' '.join(command)}` failed with exit status {done.returncode}" + (f"; see {log}" if log else ""))


def sweep(config: str, param: str, values: list[str], seeds: list[int], out: Path) -> list[Path]:
    """A `renio-pl-sweep` (resumed where it stopped); returns the folder of each label's seeds, label-major."""
    run([sys.executable, "-m", "renio_pl.sweep", "--config", config, "--param", param, "--values", *values,
         "--seeds", *map(str, seeds), "--out", str(out)])
    return [out / value.split("=", 1)[0] / f"seed{seed}" for value in values for seed in seeds]


def redi(seed: int, out: Path) -> Path:
    """The three REDI steps for one seed in `out/seed<seed>` (stages in `sft/` and `redi/`); returns that folder."""
    folder = out / f"seed{seed}"
    traces, sft_student = folder / "traces", folder / "sft_student"
    if not (traces / "redi.jsonl").is_file():
        run([sys.executable, "-m", "renio_pl.offline.traces", "--config", "configs/demo_redi_traces.yaml",
             "--output", str(traces), "--seed", str(seed)], folder / "traces.log")
    for stage, config, train, student in (
        ("sft", "configs/demo_redi_sft.yaml", traces / "sft.jsonl", "demo_assets/student"),
        ("redi", "configs/demo_redi.yaml", traces / "redi.jsonl", str(sft_student)),
    ):
        stage_dir = folder / stage
        if (stage_dir / "done").is_file():
            continue
        settings = yaml.safe_load((REPO / config).read_text())
        settings["seed_everything"] = seed
        settings["trainer"]["default_root_dir"] = str(stage_dir)
        settings["trainer"]["logger"]["init_args"]["save_dir"] = str(stage_dir)
        for callback in settings["trainer"]["callbacks"]:
            if callback["class_path"] == "renio_pl.offline.SaveStudent":
                callback["init_args"]["folder"] = str(sft_student if stage == "sft" else folder / "redi_student")
        settings["model"]["student"] = student
        settings["data"]["train_path"], settings["data"]["seed"] = str(train), seed
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        run([sys.executable, "-m", "renio_pl.offline.cli", "fit", "--config", str(stage_dir / "config.yaml")],
            stage_dir / "fit.log")
        (stage_dir / "done").touch()
    return folder


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return ""
    cell = f"{scale * mean(values):.{digits}f}"
    return cell + (f" ± {scale * stdev(values):.{digits}f}" if len(values) > 1 else "")


def _mean_over_rounds(series: dict, metric: str) -> float | None:
    values = [value for _, value in series.get(metric, [])]
    return mean(values) if values else None


def tables(methods: dict[str, list[Path]], initial: float) -> str:
    """Accuracy per method and the diagnostic weighters' AUROC, mean ± std over seeds."""
    lines = [
        f"Held-out greedy accuracy on 500 problems (%), mean ± sample std over seeds; {100 * initial:.1f}% before "
        "training. `final`: after the last epoch; `best`: the best evaluation of the run.\n",
        "| method | seeds | final | best |", "|---|---|---|---|",
    ]
    auroc_rows = []
    for method, folders in methods.items():
        logged = [read_series(find_metrics(folder)) for folder in folders]
        headline = [summarize(series) for series in logged]
        lines.append(f"| {method} | {len(folders)} | {_mean_std([h['final_accuracy'] for h in headline], 100, 1)} | "
                     f"{_mean_std([h['best_accuracy'] for h in headline], 100, 1)} |")
        aurocs = [[_mean_over_rounds(series, f"diag/{w}/auroc_incorrect") for series in logged] for w in DIAGNOSTIC]
        if all(value is not None for values in aurocs for value in values):
            auroc_rows.append(f"| {method} | " + " | ".join(_mean_std(values, 1, 3) for values in aurocs) + " |")
    lines += [
        "", "AUROC of each weighter's weight for predicting an incorrect rollout, computed on the same rollouts of "
        "each run (diagnostic: only the method's own weights train), mean over rounds, then mean ± std over seeds. "
        "The diagnostic weighters use the release defaults (ReNIO: threshold 0.8, clip 2.5, batch mean, "
        "which is also what the demo trains with).\n",
        "| rollouts of | " + " | ".join(DIAGNOSTIC) + " |", "|---|" + "---|" * len(DIAGNOSTIC), *auroc_rows,
    ]
    return "\n".join(lines) + "\n"


MECHANISM_PANELS = [  # (metric logged, panel title)
    ("val/group_accuracy/carry", "held-out accuracy, carry problems"),
    ("val/group_accuracy/no_carry", "held-out accuracy, carry-free problems"),
    ("diag/active/ess_share", "effective sample share of the weights"),
    ("diag/active/top10_loss_share", "loss share of the top 10% of rollouts"),
    ("diag/grad_norm", "gradient norm (round mean)"),
]


def mechanism_figure(methods: dict[str, list[Path]], path: Path) -> None:
    """One panel per `MECHANISM_PANELS` metric, one line per method (mean over its runs' folders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {method: [read_series(find_metrics(folder)) for folder in folders] for method, folders in methods.items()}
    figure, axes = plt.subplots(1, len(MECHANISM_PANELS), figsize=(4.2 * len(MECHANISM_PANELS), 3.4))
    for axis, (metric, title) in zip(axes, MECHANISM_PANELS):
        for method, runs in logged.items():
            curves = [series[metric] for series in runs if metric in series]
            if curves:
                steps, values = zip(*mean_curve(curves))
                axis.plot(steps, values, label=f"{method} (n={len(curves)})")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    if "--mechanism" in sys.argv:
        parser = argparse.ArgumentParser(description="the mechanism figure of a sweep's runs")
        parser.add_argument("--mechanism", type=Path, required=True, help="the sweep's folder")
        parser.add_argument("labels", nargs="+", help="method folders under it, e.g. renio/0.0003 (`name=folder`)")
        parser.add_argument("--figure", type=Path, required=True)
        args = parser.parse_args()
        methods = {}
        for label in args.labels:
            name, _, folder = label.rpartition("=")
            methods[name or folder] = sorted((args.mechanism / folder).glob("seed*"))
        mechanism_figure(methods, args.figure)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_comparison"), help="where the runs go")
    parser.add_argument("--report", type=Path, default=Path("evaluation/reports/demo_comparison"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out, seeds = args.out.resolve(), args.seeds
    if not (REPO / "demo_assets" / "teacher").is_dir():
        sys.exit("error: demo_assets/ is missing: run `renio-pl-demo --assets-only` first")
    folders = sweep("configs/demo.yaml", "model.weighter", WEIGHTERS, seeds, out / "weighters")
    methods = {label.split("=")[0]: folders[i * len(seeds) : (i + 1) * len(seeds)] for i, label in enumerate(WEIGHTERS)}
    methods["trd (every round)"] = sweep("configs/demo_trd.yaml", "data.refiner.init_args.schedule",
                                         ["every_round"], seeds, out / "trd")
    redi_runs = [redi(seed, out / "redi") for seed in seeds]
    methods["redi stage 1 (sft)"] = [folder / "sft" for folder in redi_runs]
    methods["redi stage 2 (redi, from stage 1)"] = [folder / "redi" for folder in redi_runs]
    initial = summarize(read_series(find_metrics(methods["uniform"][0])))["initial_accuracy"]
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "tables.md").write_text(tables(methods, initial))
    curves = {}
    for method, runs in methods.items():
        if not method.startswith("redi"):  # REDI's evaluations are on its own step scale
            curves[method] = mean_curve([read_series(find_metrics(folder))["val/accuracy"] for folder in runs])
    plot_series(curves, [list(curves)], args.report / "accuracy.png")
    shutil.copy(out / "weighters" / "sweep.png", args.report / "weighters_sweep.png")
    run([sys.executable, "-m", "renio_pl.report", str(methods["renio"][0]), "--out", str(args.report / "renio_seed0")])
    print((args.report / "tables.md").read_text())


if __name__ == "__main__":
    main()

"""Final held-out accuracy per problem group of every run a `renio-pl-sweep` left, for runs that
trained without `data.group_field`.

For each run folder (`SWEEP/<label>/.../seed<N>/`) this evaluates the run's last checkpoint
with `renio-pl validate` (the run's own `config.yaml`, plus `--data.group_field GROUP`), which
writes `final_by_group/metrics.csv` there (an existing one is reused), then prints per
combination of options the mean ± 95% interval over seeds (`renio_pl.sweep_tables.interval95`)
of the accuracy and of each group's accuracy, as a markdown table.

    python evaluation/final_by_group.py runs/answer_long --group-field group

Run it from the folder the sweep ran in (the configs' relative paths resolve there).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

from renio_pl.sweep_tables import interval95

OUT = "final_by_group"


def evaluate(run: Path, group_field: str) -> dict[str, float]:
    """The metrics `renio-pl validate` logs for `run`'s last checkpoint, grouped by `group_field`."""
    metrics = run / OUT / "metrics.csv"
    if not metrics.is_file():
        version = sorted(run.glob("version_*"))[-1]
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(run / OUT), "name": "", "version": ""}}
        with (run / f"{OUT}.log").open("w") as log:
            subprocess.run([sys.executable, "-m", "renio_pl.cli", "validate", "--config", str(version / "config.yaml"),
                            "--ckpt_path", str(version / "checkpoints" / "last.ckpt"), f"--data.group_field={group_field}",
                            "--trainer.callbacks", "null", "--trainer.logger", json.dumps(logger)],
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    row = next(csv.DictReader(metrics.open()))
    return {name: float(value) for name, value in row.items() if name.startswith("val/") and value}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's --out folder")
    parser.add_argument("--group-field", required=True, help="the held-out data's group column")
    args = parser.parse_args(argv)
    by_label: dict[str, list[dict[str, float]]] = {}
    for result_file in sorted(args.sweep.glob("**/seed*/result.json")):
        result = json.loads(result_file.read_text())
        if result["returncode"] == 0:
            by_label.setdefault(result["label"], []).append(evaluate(result_file.parent, args.group_field))
    names = sorted({name for runs in by_label.values() for metrics in runs for name in metrics})
    print("| options | seeds | " + " | ".join(f"final {n.removeprefix('val/')} (%)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, runs in by_label.items():
        cells = []
        for name in names:
            values = [100 * metrics[name] for metrics in runs if name in metrics]
            half = interval95(values)
            cells.append(f"{mean(values):.1f}" + (f" ± {half:.1f}" if half is not None else ""))
        print(f"| `{label}` | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

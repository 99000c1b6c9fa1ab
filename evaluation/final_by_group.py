"""Final held-out accuracy per problem group of every run a `renio-pl-sweep` left, for runs that
trained without `data.group_field`.

For each run folder (`SWEEP/<label>/.../seed<N>/`) this evaluates the run's last checkpoint
with `renio-pl validate` (the run's own `config.yaml`, plus `--data.group_field GROUP`), which
writes `final_by_group/metrics.csv` there (an existing one is reused), then prints per
combination of options the mean ± 95% interval over seeds of the accuracy and of each group's
accuracy, as the sweep's own markdown table (`renio_pl.sweep_tables`).

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

from renio_pl.sweep_tables import GROUP_PREFIX, aggregate, sweep_markdown

OUT = "final_by_group"


def evaluate(run: Path, group_field: str) -> dict[str, float]:
    """`run`'s final accuracy, overall and per group of `group_field`, from its last checkpoint."""
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
    found = {"final_accuracy": float(row["val/accuracy"])}  # the names of `renio_pl.sweep_tables.run_metrics`
    found |= {"final_group_accuracy/" + name.removeprefix(GROUP_PREFIX): float(value)
              for name, value in row.items() if name.startswith(GROUP_PREFIX) and value}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's --out folder")
    parser.add_argument("--group-field", required=True, help="the held-out data's group column")
    args = parser.parse_args(argv)
    results = []
    for result_file in sorted(args.sweep.glob("**/seed*/result.json")):
        result = json.loads(result_file.read_text())
        if result["returncode"] == 0:
            results.append({**result, "metrics": evaluate(result_file.parent, args.group_field)})
    print(sweep_markdown("", aggregate(results), f"# Final held-out accuracy per `{args.group_field}`\n"), end="")


if __name__ == "__main__":
    main()

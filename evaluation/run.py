"""Evaluate one model on several benchmarks in one `renio-pl test` run, and write a markdown report.

    python evaluation/run.py --student Qwen/Qwen3-1.7B                       # AIME24, AIME25, HMMT25
    python evaluation/run.py --student runs/opd/student --benchmarks math500 gsm8k --limit 50
    python evaluation/run.py --student <folder> -- --data.test_sampling.n 4  # anything after -- goes to renio-pl

Each benchmark's data, fields, and own prompt and verifier (code) come from
`configs/eval/<benchmark>.yaml`; the first one's config supplies the shared settings (the
default prompt, sampling, trainer): run math and code benchmarks apart, as their sampling
budgets differ. One process group samples
every benchmark, the table goes to `evaluation/results/<label>.md` with the exact command,
and per-problem JSON (every completion) stays in the run folder the report names.
Run from the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "eval"


def benchmark_sets(names: list[str], limit: int) -> list[dict]:
    """The `data.test_sets` entries of the named benchmarks' configs."""
    sets = []
    for name in names:
        config = CONFIGS / f"{name}.yaml"
        if not config.is_file():
            known = sorted(p.stem for p in CONFIGS.glob("*.yaml") if "test_sets:" in p.read_text())
            sys.exit(f"error: no benchmark config {config.relative_to(ROOT)}; known: {', '.join(known)}")
        for entry in yaml.safe_load(config.read_text())["data"]["test_sets"]:
            if isinstance(entry.get("prompt_format"), str):  # a file next to the config: inline it
                entry["prompt_format"] = yaml.safe_load((CONFIGS / entry["prompt_format"]).read_text())
            sets.append({**entry, "limit": limit} if limit else entry)
    return sets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="hub id or local folder of the model to evaluate")
    parser.add_argument("--benchmarks", nargs="+", default=["aime24", "aime25", "hmmt25"])
    parser.add_argument("--label", help="report name (default: the student's last path part)")
    parser.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark (0: all)")
    args = parser.parse_args(own)
    label = args.label or Path(args.student.rstrip("/")).name
    run_folder = Path("runs") / "eval" / label
    command = [
        "test", "--config", str((CONFIGS / f"{args.benchmarks[0]}.yaml").relative_to(ROOT)),
        "--model.student", args.student,
        "--data.test_sets", json.dumps(benchmark_sets(args.benchmarks, args.limit)),
        "--trainer.logger.init_args.save_dir", str(run_folder),
        *extra,
    ]
    print("$ renio-pl", shlex.join(command), flush=True)
    if subprocess.run([sys.executable, "-m", "renio_pl.cli", *command], cwd=ROOT).returncode != 0:
        return 1
    results = max((ROOT / run_folder).glob("**/eval/results.md"), key=lambda p: p.stat().st_mtime)
    report = ROOT / "evaluation" / "results" / f"{label}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        f"# {label}\n\n"
        f"- model: `{args.student}`\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- command (from the repository root): `python evaluation/run.py {shlex.join(argv)}`\n"
        f"- per-problem results and completions: `{results.parent.relative_to(ROOT)}/<benchmark>.json`\n"
        + ("- **a quick run on the first problems only, not the benchmarks' numbers**\n" if args.limit else "")
        + "\nMetrics in %: Avg@k (mean accuracy over k samples per problem), maj@k, pass@k (unbiased).\n\n"
        + results.read_text()
    )
    print(f"report: {report.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

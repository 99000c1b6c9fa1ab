"""Code evaluation: every canonical solution of HumanEval+ and MBPP+, graded by renio_pl and by EvalPlus.

    python benchmarks/code_eval.py --workers 2 [--evalplus-python /tmp/evalplus-venv/bin/python]

For each dataset it prints the pass counts (base; plus = base and extra tests) and the wall
time of `renio_pl.evaluators.code.evaluate_solutions` with a cold expected-output cache (a
fresh RENIO_PL_CACHE) and then warm, and the same for EvalPlus 0.3.1 when its Python is
given (or evalplus is importable here): its own CLI, `python -m evalplus.evaluate --dataset D
--samples F --parallel W`, reading the local data files through HUMANEVAL_OVERRIDE_PATH and
MBPP_OVERRIDE_PATH, first with an empty cache (a fresh XDG_CACHE_HOME), then warm.

    PYTHON_WITH_EVALPLUS benchmarks/code_eval.py evalplus-check DATASET < solutions.jsonl

prints, per solution (`{"task_id", "solution"}` lines), EvalPlus's own verdict as a JSON line
`{"task_id", "base", "plus"}` (statuses "pass", "fail", "timeout"), computing expected outputs
only for the tasks given, as `evalplus.evaluate.get_groundtruth` does, and checking with its
`check_correctness` (fast check, default limits). tests/test_code_eval.py compares with it.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "evaluation" / "data" / "code"
FILES = {"humaneval": "HumanEvalPlus-v0.1.10.jsonl.gz", "mbpp": "MbppPlus-v0.2.0.jsonl.gz"}
OVERRIDES = {"HUMANEVAL_OVERRIDE_PATH": str(DATA / FILES["humaneval"]), "MBPP_OVERRIDE_PATH": str(DATA / FILES["mbpp"])}


def canonical_solutions(dataset: str) -> list[dict]:
    """`{"task_id", "solution"}` with each task's prompt + canonical solution, in file order."""
    rows = [json.loads(line) for line in gzip.open(DATA / FILES[dataset], "rt") if line.strip()]
    return [{"task_id": row["task_id"], "solution": row["prompt"] + row["canonical_solution"]} for row in rows]


def evalplus_check(dataset: str) -> None:
    """EvalPlus's verdict on the solutions on stdin (run with a Python that has evalplus 0.3.1)."""
    os.environ.update(OVERRIDES)  # read at import
    from evalplus.data import get_human_eval_plus, get_mbpp_plus
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.evaluate import check_correctness
    from evalplus.gen.util import trusted_exec

    problems = get_human_eval_plus() if dataset == "humaneval" else get_mbpp_plus()
    not_none = MBPP_OUTPUT_NOT_NONE_TASKS if dataset == "mbpp" else []
    solutions = [json.loads(line) for line in sys.stdin if line.strip()]
    expected = {}
    for task_id in dict.fromkeys(solution["task_id"] for solution in solutions):
        problem, oracle = problems[task_id], {}
        for stage in ("base", "plus"):
            oracle[stage], oracle[f"{stage}_time"] = trusted_exec(
                problem["prompt"] + problem["canonical_solution"], problem[f"{stage}_input"], problem["entry_point"],
                record_time=True, output_not_none=problem["entry_point"] in not_none,
            )
        expected[task_id] = oracle
    for solution in solutions:
        task_id = solution["task_id"]
        result = check_correctness(dataset, 0, problems[task_id], solution["solution"], expected[task_id],
                                   fast_check=True)
        print(json.dumps({"task_id": task_id, "base": result["base"][0], "plus": result["plus"][0]}), flush=True)


def time_renio(dataset: str, workers: int) -> list[tuple[str, float, int, int]]:
    """(cache state, seconds, base passes, plus passes) of renio_pl on all canonical solutions, cold then warm."""
    from renio_pl.evaluators.code import evaluate_solutions

    solutions, rows = canonical_solutions(dataset), []
    with tempfile.TemporaryDirectory(prefix="renio_pl_cache_") as cache:
        os.environ["RENIO_PL_CACHE"] = cache
        for state in ("cold", "warm"):
            start = time.perf_counter()
            results = evaluate_solutions(solutions, dataset, workers=workers)
            seconds = time.perf_counter() - start
            base, plus = sum(r["base_passed"] for r in results), sum(r["plus_passed"] for r in results)
            rows.append((state, seconds, base, plus))
    return rows


def time_evalplus(python: str, dataset: str, workers: int) -> list[tuple[str, float, int, int]]:
    """The same with EvalPlus's own CLI in `python`, cold (empty cache) then warm."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="evalplus_") as folder:
        samples = Path(folder) / "samples.jsonl"
        samples.write_text("".join(json.dumps(s) + "\n" for s in canonical_solutions(dataset)))
        env = {**os.environ, **OVERRIDES, "XDG_CACHE_HOME": str(Path(folder) / "cache")}
        for state in ("cold", "warm"):
            results_path = Path(folder) / "samples_eval_results.json"
            results_path.unlink(missing_ok=True)  # EvalPlus would reuse its last results
            start = time.perf_counter()
            subprocess.run([python, "-m", "evalplus.evaluate", "--dataset", dataset, "--samples", str(samples),
                            "--parallel", str(workers)], env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            graded = [r[0] for r in json.loads(results_path.read_text())["eval"].values()]
            rows.append((state, seconds, sum(r["base_status"] == "pass" for r in graded),
                         sum(r["base_status"] == r["plus_status"] == "pass" for r in graded)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "evalplus-check"])
    parser.add_argument("dataset", nargs="?", choices=list(FILES), help="evalplus-check only")
    parser.add_argument("--workers", type=int, default=2, help="programs run at once (EvalPlus: --parallel)")
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--evalplus-python", help="a Python with evalplus 0.3.1 (default: this one, if it has it)")
    args = parser.parse_args()
    if args.mode == "evalplus-check":
        evalplus_check(args.dataset or parser.error("evalplus-check needs a dataset"))
        return
    evalplus_python = args.evalplus_python or (sys.executable if importlib.util.find_spec("evalplus") else None)
    print(f"all canonical solutions, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"  {'dataset':<10} {'grader':<9} {'cache':<5} {'seconds':>8} {'base pass':>10} {'plus pass':>10}")
    for dataset in args.datasets:
        total = len(canonical_solutions(dataset))
        graders = [("renio_pl", lambda d=dataset: time_renio(d, args.workers))]
        if evalplus_python:
            graders.append(("evalplus", lambda d=dataset: time_evalplus(evalplus_python, d, args.workers)))
        for grader, timed in graders:
            for state, seconds, base, plus in timed():
                counts = f"{base:>6}/{total:<3} {plus:>6}/{total:<3}"
                print(f"  {dataset:<10} {grader:<9} {state:<5} {seconds:>8.1f} {counts}", flush=True)
    if not evalplus_python:
        print("  (EvalPlus not run: give --evalplus-python, e.g. a venv with `pip install evalplus==0.3.1`)")


if __name__ == "__main__":
    main()

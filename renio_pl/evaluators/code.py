"""HumanEval+ and MBPP+ graded with EvalPlus 0.3.1's semantics, every program run in the sandbox.

`evaluate_solutions(solutions, dataset)` returns, per solution, whether it passes the base
tests and the base plus the extra tests (EvalPlus's "plus": both must pass), as EvalPlus
0.3.1 decides it:

- Expected outputs come from running each task's canonical solution on its inputs
  (MBPP+ inputs converted to tuples, sets, complex numbers as EvalPlus converts them),
  each call timed, in the sandbox. They are cached on disk ($RENIO_PL_CACHE, else
  ~/.cache/renio_pl; one folder per data file's sha256, files per task, mode 600) and
  computed only for the tasks asked for.
- A solution's stage (base, then plus if base passed) runs in one sandboxed process: the
  entry point is called on each input in order, under a limit of max(1 s, 4 x the
  canonical call's time); the run as a whole gets min(60 s, the limits' sum) + 2 s (+1 s
  for our heavier process start). The first failing test ends the stage (EvalPlus's fast
  check).
- Comparison: `out == expected`; MBPP's special oracles by entry point (surface_Area and
  digit_distance_nums also accept their oracle's answer, the set tasks compare `set(out)`,
  check_str / text_match_three / text_starta_endb only "is not None"; are_equivalent and
  sum_div are not in MBPP+ v0.2.0); a float tolerance (the task's atol, or 1e-6 once a
  float output was expected, kept for the rest of the stage, as in EvalPlus) for outputs of
  the same type and length. HumanEval/32 (find_zero) never passes: EvalPlus 0.3.1 checks
  |poly(x)| <= atol but its `continue` skips recording the pass, so its canonical solution
  fails too.

Differences, by design: outputs are compared outside the sandbox (harness.py), so an
object whose `__eq__` always says True does not pass; programs run with PYTHONHASHSEED=0,
canonical and candidate alike, so set-order-dependent outputs are reproducible (EvalPlus
uses one random seed per process); an output over 64 KiB pickled is compared by digest
first and sent only if that differs, and one whose encoding exceeds 32 MiB can only match
by digest (only five Mbpp/255 outputs are that large).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import ast
import json
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from renio_pl.errors import ConfigError
from renio_pl.evaluators import harness, sandbox
from renio_pl.evaluators.verifier import BatchVerifier, Verdict
from renio_pl.prompts import check_sha256
from renio_pl.resources import shipped_path

__all__ = ["evaluate_solutions", "load_problems", "Problem", "DATASETS", "extract_program", "CodeVerifier"]

log = logging.getLogger(__name__)

DATA_DIR = shipped_path("evaluation/data/code", must_exist=False)  # in the checkout or the installed wheel
DATASETS = {"humaneval": "HumanEvalPlus-v0.1.10.jsonl.gz", "mbpp": "MbppPlus-v0.2.0.jsonl.gz"}
MIN_TIME_LIMIT_S = 1.0  # EvalPlus 0.3.1 defaults (evalplus/config.py, eval/__init__.py)
TIME_LIMIT_FACTOR = 4.0
STAGE_TIMEOUT_CAP_S = 60.0
MEMORY_BYTES = 4 << 30
_START_S = 1.0  # a sandboxed interpreter starts slower than EvalPlus's forked worker
_CANONICAL_TIMEOUT_S = 600.0
_INLINE_BYTES = 64 << 10  # outputs up to this size (pickled) are sent with their report
_VALUE_BYTES = 32 << 20  # longest encoded output sent or cached
_CACHE_VERSION = "v1"
_STAGES = ("base", "plus")
_ENV = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# MBPP tasks with special oracles (evalplus/eval/_special_oracle.py, keyed by entry point).
_MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
_MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
_MBPP_ORACLES = {"are_equivalent", "sum_div", "surface_Area", "digit_distance_nums"}


@dataclass(frozen=True)
class Problem:
    """One HumanEval+ or MBPP+ task: the canonical program and the inputs of each stage."""

    task_id: str
    entry_point: str
    prompt: str  # what the model is shown (HumanEval: signature and docstring; MBPP: description and a test)
    canonical: str  # prompt + canonical solution, the program EvalPlus runs for expected outputs
    inputs: dict[str, list]  # "base" / "plus" -> argument lists
    atol: float


def _tuple_deep(value):
    return tuple(_tuple_deep(item) for item in value) if isinstance(value, list) else value


def _ids(*numbers: int) -> list[str]:
    return [f"Mbpp/{n}" for n in numbers]


# How EvalPlus 0.3.1 turns MBPP+'s JSON arguments back into Python values (data/mbpp.py).
_MBPP_ARGUMENTS = {
    **dict.fromkeys(_ids(2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630,
                         726, 740, 744, 809), lambda args: [tuple(arg) for arg in args]),
    **dict.fromkeys(_ids(63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780),
                    lambda args: [[tuple(item) for item in arg] for arg in args]),
    **dict.fromkeys(_ids(75, 413, 444, 753), lambda args: [[tuple(item) for item in args[0]], args[1]]),
    **dict.fromkeys(_ids(106, 750), lambda args: [args[0], tuple(args[1])]),
    "Mbpp/115": lambda args: [[set(item) if isinstance(item, list) and item else {} for item in args[0]]],
    "Mbpp/124": lambda args: (float(args[0]), complex(args[1])),
    **dict.fromkeys(_ids(250, 405, 446, 617, 720, 763, 808), lambda args: [tuple(args[0]), args[1]]),
    **dict.fromkeys(_ids(259, 401, 445), lambda args: [tuple(tuple(item) for item in arg) for arg in args]),
    "Mbpp/278": lambda args: [tuple(tuple(item) if isinstance(item, list) else item for item in args[0])],
    "Mbpp/307": lambda args: [tuple(args[0]), args[1], args[2]],
    "Mbpp/722": lambda args: [{key: tuple(value) for key, value in args[0].items()}, *args[1:]],
    "Mbpp/252": lambda args: [complex(args[0])],
    **dict.fromkeys(_ids(580, 615, 791), _tuple_deep),
}


@functools.cache
def load_problems(dataset: str) -> dict[str, Problem]:
    """The tasks of `dataset` ("humaneval" or "mbpp"), from the checked release file in `DATA_DIR`."""
    path = _data_path(dataset)
    problems = {}
    for line in gzip.decompress(path.read_bytes()).decode().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        convert = _MBPP_ARGUMENTS.get(row["task_id"], lambda args: args)
        inputs = {stage: [convert(args) for args in row[f"{stage}_input"]] for stage in _STAGES}
        problems[row["task_id"]] = Problem(row["task_id"], row["entry_point"], row["prompt"],
                                           row["prompt"] + row["canonical_solution"], inputs, row["atol"])
    return problems


def _data_path(dataset: str) -> Path:
    if dataset not in DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    path = DATA_DIR / DATASETS[dataset]
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall renio-pl (its wheel and its source checkout ship it)")
    check_sha256(path, str(path), f"evaluate_solutions(dataset={dataset!r})")
    return path


# ---------------------------------------------------------------- expected outputs


@dataclass
class _Expected:
    """The canonical outputs of one stage of a task: per call its time, digest and flags; values lazily."""

    times: list[float]
    sha: list[str | None]
    by_digest: list[bool]  # an output with the same digest is equal (harness.equal_by_digest)
    floats: list[bool]  # EvalPlus's is_floats(expected), which switches on the 1e-6 tolerance
    offsets: list[int | None]  # where each encoded value starts in the values file; None: not stored
    values_path: Path

    def value(self, index: int) -> object:
        """The expected output of call `index`; raises LookupError if it was too large to keep."""
        if self.offsets[index] is None:
            raise LookupError("expected output too large to keep")
        with self.values_path.open("rb") as file:
            file.seek(self.offsets[index])
            return harness.decode(file.readline())


def _cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("RENIO_PL_CACHE") or Path.home() / ".cache" / "renio_pl")
    return root / "code_expected" / _CACHE_VERSION / _sha256(path)


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected(dataset: str, task_ids: list[str], workers: int) -> dict[str, dict[str, _Expected]]:
    """Expected outputs per task and stage: from the cache, or computed (in parallel) and cached."""
    folder = _cache_dir(_data_path(dataset))
    paths = {task_id: folder / task_id.replace("/", "_") for task_id in task_ids}
    missing = [task_id for task_id in task_ids if not paths[task_id].with_suffix(".json").is_file()]
    if missing:
        started = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        problems = load_problems(dataset)

        def compute(task_id: str) -> None:
            runs = {stage: _run_canonical(problems[task_id], stage) for stage in _STAGES}
            _write_cache(paths[task_id], dataset, problems[task_id], runs)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(compute, missing))
        log.info("computed expected outputs of %d %s tasks in %.1fs", len(missing), dataset,
                 time.monotonic() - started)
    return {task_id: _read_cache(paths[task_id]) for task_id in task_ids}


def _run_canonical(problem: Problem, stage: str) -> list[tuple[dict, bytes | None]]:
    """Runs the canonical program on one stage's inputs: per call its report and its encoded value."""
    calls: list[tuple[dict, bytes | None]] = []

    def on_report(line: bytes, reply) -> bool:
        if calls and calls[-1][0].get("value") and calls[-1][1] is None:
            calls[-1] = (calls[-1][0], line)
        else:
            calls.append((json.loads(line), None))
        return True

    limits = sandbox.Limits(timeout_s=_CANONICAL_TIMEOUT_S, memory_bytes=2 * MEMORY_BYTES,
                            report_bytes=_VALUE_BYTES + 1024)
    payload = _payload(problem, stage, problem.canonical, None)
    result = sandbox.run(_harness_argv(), stdin=payload, env=_ENV, limits=limits, on_report=on_report)
    failure = next((report.get("load") or report.get("error") for report, _ in calls
                    if report.get("load") or report.get("error")), None)
    if failure or len(calls) != len(problem.inputs[stage]):
        raise RuntimeError(
            f"the canonical solution of {problem.task_id} failed on its {stage} inputs after {len(calls)} calls: "
            f"{failure or f'exit {result.returncode}, timed out {result.timed_out}'} {result.stderr[-500:]!r}"
        )
    return calls


def _write_cache(path: Path, dataset: str, problem: Problem, runs: dict[str, list]) -> None:
    """Writes `<path>.json` (times, digests, flags, offsets) and `<path>.values` (encoded outputs)."""
    meta: dict[str, dict[str, list]] = {}
    values = bytearray()
    not_none = dataset == "mbpp" and problem.entry_point in _MBPP_NOT_NONE
    for stage, calls in runs.items():
        columns: dict[str, list] = {"times": [], "sha": [], "by_digest": [], "floats": [], "offsets": []}
        for report, value in calls:
            if not_none:  # EvalPlus keeps only whether the canonical output is not None
                value, report = json.dumps(["json", value != b'["json", null]']).encode(), {**report, "sha": None}
            columns["times"].append(report["t"])
            columns["sha"].append(report["sha"])
            columns["by_digest"].append(report["by_digest"])
            columns["floats"].append(report["floats"] and not not_none)
            columns["offsets"].append(None if value is None else len(values))
            if value is not None:
                values += value + b"\n"
        meta[stage] = columns
    _write_private(path.with_suffix(".values"), bytes(values))
    _write_private(path.with_suffix(".json"), json.dumps(meta).encode())  # last: marks the entry complete


def _write_private(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)  # mode 600
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _read_cache(path: Path) -> dict[str, _Expected]:
    meta = json.loads(path.with_suffix(".json").read_text())
    return {stage: _Expected(**columns, values_path=path.with_suffix(".values")) for stage, columns in meta.items()}


# ---------------------------------------------------------------- running and checking a solution


@functools.cache
def _harness_argv() -> list[str]:
    return [sys.executable, "-S", "-c", Path(harness.__file__).read_text()]


def _payload(problem: Problem, stage: str, code: str, time_limits: list[float] | None) -> bytes:
    """The harness's stdin; `time_limits` None runs `code` as trusted (harness.py)."""
    return pickle.dumps({
        "code": code, "entry_point": problem.entry_point,
        "inputs": problem.inputs[stage], "time_limits": time_limits, "inline_bytes": _INLINE_BYTES,
        "value_bytes": _VALUE_BYTES, "path": [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))],
    })


class _Check:
    """Checks one stage's reports as they come, with EvalPlus 0.3.1's rules; stops at the first failure."""

    def __init__(self, dataset: str, problem: Problem, stage: str, expected: _Expected) -> None:
        self.dataset, self.problem, self.expected = dataset, problem, expected
        self.inputs = problem.inputs[stage]
        self.atol = problem.atol
        self.passed = 0  # calls passed so far, in order
        self.reason: str | None = None  # "fail" or "timeout" once a call failed
        self.pending: tuple[str, int] | None = None  # the next line is call i's value: ("check" | "skip", i)
        special = _MBPP_SET_EQ | _MBPP_NOT_NONE | _MBPP_ORACLES if dataset == "mbpp" else {"find_zero"}
        self.by_digest = problem.entry_point not in special  # special checks need the values

    def __call__(self, line: bytes, reply) -> bool:
        """Takes one report line; False once the stage is decided (every call passed, or one failed)."""
        try:
            if self.pending is not None:
                (action, index), self.pending = self.pending, None
                if action == "check":
                    if not self._matches(index, harness.decode(line)):
                        return self._fail("fail")
                    self.passed += 1
                return self.passed < len(self.inputs)
            report = json.loads(line)
            if "load" in report or report["i"] != self.passed:
                return self._fail("fail")
            if report["error"] is not None:
                return self._fail("timeout" if report["error"].startswith("TimeoutException") else "fail")
            index = report["i"]
            if self.by_digest and self.expected.by_digest[index] and report["sha"] is not None \
                    and report["sha"] == self.expected.sha[index]:
                if self.atol == 0 and self.expected.floats[index]:
                    self.atol = 1e-6  # as `_matches` would have set it
                self.passed += 1
                if report["value"]:
                    self.pending = ("skip", index)
                else:
                    reply(b"next\n")
                return self.passed < len(self.inputs)
            self.pending = ("check", index)
            if not report["value"]:
                reply(b"value\n")
            return True
        except (ValueError, TypeError, KeyError, RecursionError):  # a malformed report fails the test
            return self._fail("fail")

    def _fail(self, reason: str) -> bool:
        self.reason = reason
        return False

    def _matches(self, index: int, out: object) -> bool:
        """EvalPlus 0.3.1's verdict on one output (evalplus/eval/__init__.py, `unsafe_execute`)."""
        inp, name = self.inputs[index], self.problem.entry_point
        if self.dataset == "humaneval" and name == "find_zero":
            return False  # see the module docstring: EvalPlus 0.3.1 never records this task as passed
        try:
            exp = self.expected.value(index)
        except LookupError:  # too large to keep: only an equal digest could have matched it
            return False
        try:
            exact = out == exp
            if self.dataset == "mbpp":
                if name == "are_equivalent":  # Mbpp/164
                    exact = exact or True
                elif name == "sum_div":  # Mbpp/295
                    exact = exact or out == 0
                elif name == "surface_Area":  # Mbpp/581
                    exact = exact or abs(out - _pyramid_surface(*inp)) <= self.atol
                elif name == "digit_distance_nums":  # Mbpp/558
                    exact = exact or out == _digit_distance(*inp)
                elif name in _MBPP_SET_EQ:
                    exact = set(out) == set(exp)
                elif name in _MBPP_NOT_NONE:
                    exact = out == exp if isinstance(out, bool) else exp == (out is not None)
            if self.atol == 0 and harness.is_floats(exp):
                self.atol = 1e-6  # and so for the rest of the stage, as in EvalPlus
            if not exact and self.atol != 0:
                if type(out) is not type(exp) or (isinstance(exp, (list, tuple)) and len(out) != len(exp)):
                    return False
                return bool(np.allclose(out, exp, rtol=1e-07, atol=self.atol))
            return bool(exact)
        except Exception:  # what raises in EvalPlus's comparison fails the test there too
            return False


def _pyramid_surface(base_edge: float, height: float) -> int:
    """Mbpp/581's oracle: the surface of a square pyramid with `height` as the apex's height."""
    slant = math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 2 * base_edge * slant)


def _digit_distance(a: int, b: int) -> int:
    """Mbpp/558's oracle: the sum of per-digit distances, the shorter number padded with zeros."""
    width = max(len(str(a)), len(str(b)))
    return sum(abs(int(x) - int(y)) for x, y in zip(str(a).zfill(width), str(b).zfill(width)))


def _run_stage(dataset: str, problem: Problem, stage: str, expected: _Expected, program: str) -> str:
    """Runs `program` on one stage's inputs; "pass", "fail" or "timeout"."""
    limits_s = [max(MIN_TIME_LIMIT_S, TIME_LIMIT_FACTOR * t) for t in expected.times]
    timeout = min(STAGE_TIMEOUT_CAP_S, sum(limits_s)) + 2.0 + _START_S
    limits = sandbox.Limits(timeout_s=timeout, memory_bytes=MEMORY_BYTES, stack_bytes=MEMORY_BYTES,
                            report_bytes=_VALUE_BYTES + 1024)
    check = _Check(dataset, problem, stage, expected)
    payload = _payload(problem, stage, program, limits_s)
    result = sandbox.run(_harness_argv(), stdin=payload, env=_ENV, limits=limits, on_report=check)
    calls = len(problem.inputs[stage])  # Mbpp/793 has no plus inputs: then loading is the whole test
    if check.reason is None and check.passed == calls and (calls or result.returncode == 0):
        outcome = "pass"
    else:
        out_of_time = result.timed_out or result.returncode == 128 + 24  # 24: SIGXCPU
        outcome = check.reason or ("timeout" if out_of_time else "fail")
    log.debug("%s %s: %s after %d/%d calls in %.2fs (exit %s) %r", problem.task_id, stage, outcome, check.passed,
              calls, result.seconds, result.returncode, result.stderr[-300:])
    return outcome


def evaluate_solutions(solutions: list[dict], dataset: str, *, workers: int | None = None) -> list[dict]:
    """Grades whole programs on HumanEval+ or MBPP+ as EvalPlus 0.3.1 does, each in the sandbox.

    Args:
        solutions: `{"task_id": "HumanEval/0", "solution": <program text: prompt + completion>}` each;
            a task may appear any number of times.
        dataset: "humaneval" or "mbpp".
        workers: programs run at once; default `os.cpu_count()`.

    Returns:
        One dict per solution, in order: `task_id`; `base_passed` (the original tests);
        `plus_passed` (base and extra tests, EvalPlus's "plus"); `status`: "pass",
        "base:fail", "base:timeout", "plus:fail" or "plus:timeout" (plus runs only after base passes).

    Raises:
        ConfigError: an unknown dataset or task_id, a malformed solution, workers < 1, or
            data that fails its sha256 check.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer; got {workers!r}")
    problems = load_problems(dataset)
    for i, solution in enumerate(solutions):
        if not isinstance(solution, dict) or not isinstance(solution.get("solution"), str) or "task_id" not in solution:
            raise ConfigError(
                f"solutions[{i}] must be a dict with a 'task_id' and a 'solution' string (the whole program); "
                f"got {str(solution)[:100]!r}"
            )
        if solution["task_id"] not in problems:
            first, last = next(iter(problems)), next(reversed(problems))
            raise ConfigError(f"solutions[{i}]: unknown {dataset} task_id {solution['task_id']!r}; ids run from "
                              f"{first!r} to {last!r}")
    expected = _expected(dataset, list(dict.fromkeys(s["task_id"] for s in solutions)), workers)

    def grade(solution: dict) -> dict:
        task_id = solution["task_id"]
        status = "pass"
        for stage in _STAGES:
            outcome = _run_stage(dataset, problems[task_id], stage, expected[task_id][stage], solution["solution"])
            if outcome != "pass":
                status = f"{stage}:{outcome}"
                break
        return {"task_id": task_id, "base_passed": not status.startswith("base:"), "plus_passed": status == "pass",
                "status": status}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(grade, solutions))


# ---------------------------------------------------------------- model completions -> programs

_CODE_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_KEPT_STATEMENTS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                    ast.Assign, ast.AnnAssign)


def extract_program(completion: str, prompt: str, entry_point: str) -> str:
    """The program to grade for a model's completion, as EvalPlus's sanitizer would take it.

    The reasoning (up to the last `</think>`) is dropped. From what follows, the last
    fenced code block (untagged or tagged python; one cut off at the end counts) that
    defines `entry_point` is taken, else the last fenced block, else the whole text. If that
    code does not define `entry_point`, the completion continues the prompt (a base model's
    completion) and the program is `prompt + text`. Finally only top-level imports,
    definitions and assignments are kept, so a model's example calls, `print`s, `input()`s
    and `if __name__ == "__main__":` blocks do not run (EvalPlus's `sanitize` also keeps just
    these; it prunes definitions the entry point does not reach as well, which changes no
    verdict). Code that does not parse is returned whole, and fails its tests.
    """
    text = completion.rpartition("</think>")[2]
    blocks = [code for tag, code in _CODE_BLOCK.findall(text) if tag.lower() in ("", "python", "py", "python3")]
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
    code = next((block for block in reversed(blocks) if defines.search(block)), blocks[-1] if blocks else text)
    if not defines.search(code):
        code = prompt + text
    try:
        module = ast.parse(code)
    except SyntaxError:
        return code
    module.body = [statement for statement in module.body if isinstance(statement, _KEPT_STATEMENTS)]
    return ast.unparse(module) + "\n"


class CodeVerifier(BatchVerifier):
    """HumanEval+ / MBPP+ grading for `renio-pl test`: each completion made a program and run in the sandbox.

    A completion counts as solved when it passes the base and the extra tests (EvalPlus's
    "plus"); each verdict's `detail` is `evaluate_solutions`'s status, so reports keep the
    base-test result too. References are task ids (the data's `task_id` column).

    Args:
        dataset: "humaneval" or "mbpp".
        workers: programs run at once; default `os.cpu_count()`.
    """

    majority_vote = False  # programs are not answers that can be voted on

    def __init__(self, dataset: str, workers: int | None = None) -> None:
        _data_path(dataset)  # fails now, in one line, on an unknown dataset or a bad file
        self.dataset, self.workers = dataset, workers

    def grade(self, completions: list[str], references: list[str | None]) -> list[Verdict]:
        """Runs the program of each completion with a task id; one without gets `Verdict(None)`."""
        problems = load_problems(self.dataset)
        unknown = next((task_id for task_id in references if task_id is not None and task_id not in problems), None)
        if unknown is not None:
            raise ConfigError(
                f"CodeVerifier({self.dataset!r}): the reference {unknown!r} is not a {self.dataset} task id; "
                "set the test set's answer_field to task_id"
            )
        graded = [i for i, task_id in enumerate(references) if task_id is not None]
        tasks = [problems[references[i]] for i in graded]
        solutions = [{"task_id": task.task_id, "solution": extract_program(completions[i], task.prompt, task.entry_point)}
                     for i, task in zip(graded, tasks)]
        results = evaluate_solutions(solutions, self.dataset, workers=self.workers)
        verdicts = [Verdict(None)] * len(completions)
        for i, result in zip(graded, results, strict=True):
            verdicts[i] = Verdict(result["plus_passed"], detail=result["status"])
        return verdicts

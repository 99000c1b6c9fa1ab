"""HumanEval+ and MBPP+ graded with EvalPlus 0.3.1's semantics, every program run in the sandbox.

`evaluate_solutions(solutions, dataset)` returns, per solution, whether it passes the base
tests and the base plus the extra tests (EvalPlus's "plus": both must pass), as EvalPlus
0.3.1 decides it; `CodeVerifier` grades model completions with it (`extract_program` makes
each completion a program). The parts, each in its own module:

- `code_problems`: the tasks, from the checked release files in `DATA_DIR`;
- `code_expected`: each task's expected outputs, from its canonical solution, cached on disk;
- `code_runs`: one stage (base, then plus if base passed) of a program, run in one
  sandboxed process under EvalPlus's time limits;
- `code_oracles`: EvalPlus's comparison of the outputs (float tolerance, MBPP's special
  oracles, find_zero); the first failing test ends the stage.

Each module's docstring says where it differs from EvalPlus, by design.
"""

from __future__ import annotations

import ast
import os
import re
from concurrent.futures import ThreadPoolExecutor

from renio_pl.errors import ConfigError
from renio_pl.evaluators.code_expected import expected_outputs
from renio_pl.evaluators.code_problems import DATA_DIR, DATASETS, STAGES, Problem, data_path, load_problems
from renio_pl.evaluators.code_runs import run_stage
from renio_pl.evaluators.verifier import BatchVerifier, Verdict

__all__ = ["evaluate_solutions", "load_problems", "Problem", "DATASETS", "DATA_DIR", "extract_program", "CodeVerifier"]


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
    expected = expected_outputs(dataset, list(dict.fromkeys(s["task_id"] for s in solutions)), workers)

    def grade(solution: dict) -> dict:
        task_id = solution["task_id"]
        status = "pass"
        for stage in STAGES:
            outcome = run_stage(dataset, problems[task_id], stage, expected[task_id][stage], solution["solution"])
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
        data_path(dataset)  # fails now, in one line, on an unknown dataset or a bad file
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

"""HumanEval+ and MBPP+ tasks, read from the EvalPlus release files as EvalPlus 0.3.1 reads them.

`load_problems(dataset)` gives each task's prompt, canonical program and the inputs of its
two test stages, "base" (the original tests) and "plus" (the extra ones); MBPP+'s JSON
arguments are turned back into tuples, sets and complex numbers as EvalPlus turns them.
Each file is checked against `SHA256SUMS` when it is read.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from renio_pl.errors import ConfigError
from renio_pl.evaluators import harness
from renio_pl.prompts import check_sha256
from renio_pl.resources import shipped_path

__all__ = ["DATA_DIR", "DATASETS", "STAGES", "Problem", "Expected", "load_problems", "data_path"]

# Where the release files live: `evaluation/data/code/` at the top of a source checkout, or the
# same folder inside an installed wheel (`renio_pl/_shipped/`; `renio_pl.resources` finds
# either). Its parent holds `SHA256SUMS` and `PROVENANCE.md`. Read when a file is loaded, so a
# test may point it elsewhere.
DATA_DIR: Path = shipped_path("evaluation/data/code", must_exist=False)
DATASETS = {"humaneval": "HumanEvalPlus-v0.1.10.jsonl.gz", "mbpp": "MbppPlus-v0.2.0.jsonl.gz"}
STAGES = ("base", "plus")  # run in this order; plus only once base passed


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
    path = data_path(dataset)
    problems = {}
    for line in gzip.decompress(path.read_bytes()).decode().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        convert = _MBPP_ARGUMENTS.get(row["task_id"], lambda args: args)
        inputs = {stage: [convert(args) for args in row[f"{stage}_input"]] for stage in STAGES}
        problems[row["task_id"]] = Problem(row["task_id"], row["entry_point"], row["prompt"],
                                           row["prompt"] + row["canonical_solution"], inputs, row["atol"])
    return problems


def data_path(dataset: str) -> Path:
    """The checked release file of `dataset`; a one-line ConfigError if it is unknown, missing or altered."""
    if dataset not in DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    path = DATA_DIR / DATASETS[dataset]
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall renio-pl (its wheel and its source checkout ship it)")
    check_sha256(path, str(path), f"evaluate_solutions(dataset={dataset!r})")
    return path


@dataclass
class Expected:
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

"""Running a program on one stage's inputs in the sandbox, through `harness.py`.

Each run is one sandboxed process (`renio_pl.evaluators.sandbox`) in which the harness
loads the program and calls its entry point on each input in order, reporting each output.
A candidate's call gets max(1 s, 4 x the canonical call's time); the run as a whole gets
min(60 s, the limits' sum) + 2 s (+1 s for our heavier process start), EvalPlus 0.3.1's
limits. The canonical program runs trusted, once per task, for the expected outputs
(`code_expected`). Programs run with PYTHONHASHSEED=0, canonical and candidate alike, so
set-order-dependent outputs are reproducible (EvalPlus uses one random seed per process).
An output over 64 KiB pickled is compared by digest first and sent only if that differs;
one whose encoding exceeds 32 MiB is never sent (only five Mbpp/255 outputs are that large).
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import sys
from pathlib import Path

from renio_pl.evaluators import harness, sandbox
from renio_pl.evaluators.code_oracles import StageCheck
from renio_pl.evaluators.code_problems import Expected, Problem


__all__ = ["run_canonical", "run_stage"]

log = logging.getLogger(__name__)

MIN_TIME_LIMIT_S = 1.0  # EvalPlus 0.3.1 defaults (evalplus/config.py, eval/__init__.py)
TIME_LIMIT_FACTOR = 4.0
STAGE_TIMEOUT_CAP_S = 60.0
MEMORY_BYTES = 4 << 30
_START_S = 1.0  # a sandboxed interpreter starts slower than EvalPlus's forked worker
_CANONICAL_TIMEOUT_S = 600.0
_INLINE_BYTES = 64 << 10  # outputs up to this size (pickled) are sent with their report
_VALUE_BYTES = 32 << 20  # longest encoded output sent or cached
_ENV = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_canonical(problem: Problem, stage: str) -> list[tuple[dict, bytes | None]]:
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


def run_stage(dataset: str, problem: Problem, stage: str, expected: Expected, program: str) -> str:
    """Runs `program` on one stage's inputs; "pass", "fail" or "timeout"."""
    limits_s = [max(MIN_TIME_LIMIT_S, TIME_LIMIT_FACTOR * t) for t in expected.times]
    timeout = min(STAGE_TIMEOUT_CAP_S, sum(limits_s)) + 2.0 + _START_S
    limits = sandbox.Limits(timeout_s=timeout, memory_bytes=MEMORY_BYTES, stack_bytes=MEMORY_BYTES,
                            report_bytes=_VALUE_BYTES + 1024)
    check = StageCheck(dataset, problem, stage, expected)
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

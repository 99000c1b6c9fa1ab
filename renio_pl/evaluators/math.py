"""Final-answer extraction and time-bounded equivalence checking for math benchmarks.

The answer is taken the way the Qwen2.5-Math / DeepScaleR evaluations (and the ReNIO
paper) take it: the last ``\\boxed{...}``, with text fallbacks, and is compared to the
gold answer with math-verify after a cheap normalised-string fast path. `is_correct` grades
one completion; `MathVerifier` is the same grading as a `BatchVerifier` (the one protocol the
data module grades with).
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from math_verify import parse, verify

from renio_pl.evaluators.verifier import BatchVerifier, Verdict

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0
_KILL_GRACE_S = 0.5  # the worker's own alarm should answer first; kill only if it cannot
_WORKER_START_TIMEOUT_S = 60.0
_REFIRE_S = 0.05
_WORKER_CODE = (  # the package root is appended so a source checkout imports too
    f"import sys; sys.path.append({str(Path(__file__).resolve().parents[2])!r}); "
    "from multiprocessing.connection import Connection; "
    "from renio_pl.evaluators.math import _serve; _serve(Connection(int(sys.argv[1])))"
)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\boxed\s+")
_PHRASE_RE = re.compile(r"(?:final\s+answer\s+is|answer\s+is|answer\s*:)\s*:?", re.I)
_HASH_RE = re.compile(r"####")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_BARE_RE = re.compile(r"[^\s$]*")
_BRACE_RE = re.compile(r"[{}]")
_NOISE_RE = re.compile(r"\\left|\\right|\\!|\s|\$")


def _boxed_content(text: str, match: re.Match[str], end: int) -> str | None:
    """Returns the content of the box opened by ``match`` if it closes before ``end``."""
    if not match.group().endswith("{"):  # ``\boxed 5``: the content runs to the next space or `$`
        return _BARE_RE.match(text, match.end(), end).group()
    depth = 1
    for brace in _BRACE_RE.finditer(text, match.end(), end):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[match.end() : brace.start()]
    return None


def extract_answer(completion: str) -> str | None:
    """Extracts the final answer from a model completion.

    Order: the last ``\\boxed{}`` / ``\\fbox{}`` / ``\\boxed x`` (balanced braces); an
    unclosed (truncated) or empty last box is no answer, so it and everything after it are
    dropped and extraction is retried on the text before it. Then the last "final answer
    is X" / "answer is X" / "Answer: X" (to the end of its line or sentence), then GSM8K's
    ``#### X``, then the last number (thousands commas removed).

    Args:
        completion: The generated text.

    Returns:
        The answer string, or None when nothing answer-like is found.
    """
    if not completion or not completion.strip():
        return None
    end = len(completion)
    for box in reversed(list(_BOX_RE.finditer(completion))):
        content = _boxed_content(completion, box, end)
        if content and content.strip():
            return content.strip()
        end = box.start()  # linear overall: each box is scanned only up to the next one
    completion = completion[:end]
    for pattern in (_PHRASE_RE, _HASH_RE):
        markers = list(pattern.finditer(completion))
        if markers:
            line = completion[markers[-1].end():].split("\n", 1)[0]
            answer = re.split(r"\.\s", line, maxsplit=1)[0].strip(" *$\t").rstrip(".").strip(" *$")
            if answer:
                return answer.replace(",", "") if _NUMBER_RE.fullmatch(answer) else answer
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def _normalise(answer: str) -> str:
    """Canonical string form for the exact-match fast path."""
    return re.sub(r"\\[dt]frac", r"\\frac", _NOISE_RE.sub("", answer).rstrip("."))


@functools.lru_cache(maxsize=4096)  # gold answers repeat across the samples of a prompt
def _parse_latex(answer: str) -> tuple:
    """Parses an answer with math-verify, as ``\\boxed{answer}`` first, then as ``$answer$``."""
    boxed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return tuple(boxed or parse(f"${answer}$", parsing_timeout=None))


# Time bound. math-verify's own timeouts use signal.alarm: main thread only, whole seconds,
# re-armed per step (parse gold, parse prediction, each pair compared), so steps add up. We
# disable them (hence the dropped "Timeout is disabled" warning) and, in the main thread, bound
# the whole check with one float SIGALRM timer in-process: no IPC, and the handler interrupts
# sympy's Python loops (measured: 9^{9^{9^9}}, 100000000!, 5000 "(" all stop on time). Off the
# main thread, a helper thread is no bound: sympy holds the GIL for seconds in big-integer
# arithmetic (a waiting thread did not wake for 30 s on 100000000!) and a hung thread cannot be
# killed, so it burns a core forever. A process can be killed: each non-main thread gets one
# persistent child interpreter running the same alarm-bounded check (so a slow check rarely
# costs a restart), killed if it overruns by _KILL_GRACE_S and restarted lazily. Cost: a socket
# round trip per check and a one-off ~1 s interpreter start per thread.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda r: "Timeout is disabled" not in r.getMessage())


class _CheckTimeout(BaseException):
    """Raised from SIGALRM; a BaseException so math-verify's ``except Exception`` cannot eat it."""


def _check_with_alarm(prediction: str, gold: str, timeout_s: float) -> bool:
    """Runs math-verify under one SIGALRM timer (main thread only); False on timeout.

    The timer re-fires every ``_REFIRE_S`` after the deadline in case library code swallows
    the first exception; the caller's SIGALRM handler and pending timer are restored.
    """
    armed = True

    def on_alarm(signum: int, frame: object) -> None:
        if armed:
            raise _CheckTimeout

    previous, outer, started = signal.signal(signal.SIGALRM, on_alarm), (0.0, 0.0), time.monotonic()
    try:
        outer = signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3), _REFIRE_S)
        try:
            gold_parsed = list(_parse_latex(gold))
            return verify(gold_parsed, list(_parse_latex(prediction)), timeout_seconds=None)
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CheckTimeout:
        logger.warning("math-verify timed out after %.1fs on %.200r", timeout_s, prediction)
        return False
    finally:
        signal.signal(signal.SIGALRM, previous)
        if outer[0]:  # hand a caller's own timer (e.g. pytest-timeout) back, minus our time
            remaining = max(outer[0] - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, outer[1])


def _serve(conn: Connection) -> None:
    """Worker-process loop: answers ``(prediction, gold, timeout_s)`` requests until EOF."""
    conn.send("ready")
    while True:
        try:
            prediction, gold, timeout_s = conn.recv()
        except EOFError:
            return
        try:
            result = _check_with_alarm(prediction, gold, timeout_s)
        except Exception:
            logger.warning("math check failed on %.200r vs %.200r", prediction, gold, exc_info=True)
            result = False
        conn.send(result)


class _Worker:
    """A child interpreter that runs the checks of one non-main thread and is killed if it hangs.

    A plain ``subprocess`` over a socket pair, not ``multiprocessing``: fork is unsafe in a
    multi-threaded (CUDA) trainer, and spawn/forkserver re-import the caller's ``__main__``,
    which breaks scripts without an ``if __name__ == "__main__"`` guard.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._finalizer = weakref.finalize(self, _kill, self._proc)  # thread exit ends the worker
        if not self._conn.poll(_WORKER_START_TIMEOUT_S):
            self.close()
            raise TimeoutError("math grader worker did not start")
        self._conn.recv()

    def check(self, prediction: str, gold: str, timeout_s: float) -> bool:
        """Runs one check in the worker; kills it and raises TimeoutError past the deadline."""
        self._conn.send((prediction, gold, timeout_s))
        if self._conn.poll(timeout_s + _KILL_GRACE_S):
            return self._conn.recv()
        self.close()
        raise TimeoutError(f"math grader worker hung for {timeout_s + _KILL_GRACE_S:.1f}s; killed")

    def close(self) -> None:
        """Kills the worker process."""
        self._finalizer()
        self._conn.close()


def _kill(proc: subprocess.Popen) -> None:
    """Kills and reaps a worker process."""
    proc.kill()
    proc.wait()


_local = threading.local()


def _check_in_worker(prediction: str, gold: str, timeout_s: float) -> bool:
    """Checks in this thread's worker process, (re)starting it when absent or dead."""
    worker = getattr(_local, "worker", None)
    if worker is None:
        worker = _local.worker = _Worker()
    try:
        return worker.check(prediction, gold, timeout_s)
    except BaseException:
        _local.worker = None
        worker.close()
        raise


def is_correct(completion: str, answer: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """Says whether the completion's final answer equals the gold answer mathematically.

    A normalised-string match answers at once; otherwise math-verify decides within
    ``timeout_s`` (plus ``_KILL_GRACE_S``, and a one-off worker start, off the main thread;
    see "Time bound" above). Bad model output never raises.

    Args:
        completion: The model's generated text.
        answer: The gold answer (LaTeX or plain).
        timeout_s: Wall-clock bound in seconds on the math-verify check.

    Returns:
        True iff an answer was extracted and it equals the gold answer.

    Raises:
        ValueError: If the gold answer is empty or not a string (a data bug, not a model error).
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"gold answer must be a non-empty string, got {answer!r}; fix the data")
    prediction = extract_answer(completion) if isinstance(completion, str) else None
    if not prediction:
        return False
    if _normalise(prediction) == _normalise(answer):
        return True
    try:
        if threading.current_thread() is threading.main_thread():
            return _check_with_alarm(prediction, answer, timeout_s)
        return _check_in_worker(prediction, answer, timeout_s)
    except Exception:
        logger.warning("math check failed on %.200r vs %.200r", prediction, answer, exc_info=True)
        return False


class MathVerifier(BatchVerifier):
    """Final-answer grading as a `BatchVerifier`: each completion checked alone, in order.

    The data module's default verifier, built from `data.verifier` (`check`) and
    `data.answer_extractor` (`extract`); a test set may also name it as its `verifier`.

    Args:
        check: `(completion, answer) -> bool`; default `is_correct` (math-verify).
        extract: `completion -> final answer or None`, what majority voting compares; default
            `extract_answer`.
    """

    def __init__(
        self,
        check: Callable[[str, str], bool] = is_correct,
        extract: Callable[[str], str | None] = extract_answer,
    ) -> None:
        self.check, self.extract = check, extract

    def grade(self, completions: list[str], references: list[str | None]) -> list[Verdict]:
        """Every completion's final answer; `correct` by `check` where it has a reference, else None."""
        verdicts = []
        for completion, reference in zip(completions, references, strict=True):
            final_answer = self.extract(completion)
            correct = None if reference is None else bool(self.check(completion, reference))
            verdicts.append(Verdict(correct, final_answer))
        return verdicts

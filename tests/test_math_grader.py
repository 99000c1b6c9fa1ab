"""Tests for renio_pl.evaluators.math: answer extraction and time-bounded grading."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from renio_pl.evaluators import math as grader
from renio_pl.evaluators.math import extract_answer, is_correct
from renio_pl.evaluators.verifier import Verdict

# Real gold answers copied from /work/shared/benchmarks/math/hmmt_feb25_matharena.jsonl,
# aime24_matharena.jsonl and math500_deepscaler.jsonl ("answer" field), each with an
# equivalent but differently written form and a near-miss wrong answer.
REAL_ANSWERS = [
    ("103", "103.0", "104"),
    ("-984", "-984.", "984"),
    ("\\frac{1}{576}", "1/576", "\\frac{1}{575}"),
    ("\\frac{1311}{2017}", "\\dfrac{1311}{2017}", "\\frac{1311}{2016}"),
    ("\\frac{9 \\sqrt{23}}{23}", "\\frac{9}{\\sqrt{23}}", "\\frac{9 \\sqrt{23}}{22}"),
    ("1-\\frac{2}{\\pi}", "\\frac{\\pi-2}{\\pi}", "1-\\frac{1}{\\pi}"),
    (
        "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
        "\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}",
        "\\frac{-1+\\sqrt{17}}{2}",
    ),
    ("2^{25} \\cdot 26!", "26! \\cdot 2^{25}", "2^{24} \\cdot 26!"),
    ("\\frac{2025}{101}", "2025/101", "\\frac{2024}{101}"),
    ("\\frac{448}{3}", "448/3", "\\frac{449}{3}"),
    ("8\\sqrt{10}", "\\sqrt{640}", "8\\sqrt{11}"),
    ("\\sqrt{23}-2 \\sqrt{3}", "-2\\sqrt{3}+\\sqrt{23}", "\\sqrt{23}-3 \\sqrt{2}"),
    ("14+4\\sqrt{37}", "4\\sqrt{37}+14", "14+4\\sqrt{38}"),
    ("\\sqrt{\\frac{95}{24}}", "\\frac{\\sqrt{570}}{12}", "\\sqrt{\\frac{95}{23}}"),
    ("073", "73", "74"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", "(3, \\pi)"),
]
GOLDS = [gold for gold, _, _ in REAL_ANSWERS]
PATHOLOGICAL = [
    "\\boxed{" + "(" * 5000 + "}",
    "$" + "9" * 20000 + "^" + "9" * 20000 + "$",
    "\\boxed{" * 20000,  # unclosed boxes: no recursion limit, no quadratic scan
]


def boxed(answer: str) -> str:
    """A completion with some reasoning that ends in ``\\boxed{answer}``."""
    return f"We compute 3 + 4 = 7 and simplify.\nTherefore the answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("first \\boxed{1}, on reflection \\boxed{2}", "2"),
        ("so $\\boxed{\\frac{1}{2}}$ done", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{1, \\{2\\}\\right\\}}", "\\left\\{1, \\{2\\}\\right\\}"),
        ("hence \\fbox{7}.", "7"),
        ("hence $\\boxed 5$.", "5"),
        ("got \\boxed{3}, but wait: \\boxed{\\frac{1}{", "3"),
        ("so x is 4 and \\boxed{\\frac{1}{", "4"),
        ("we get 12, so \\boxed{}", "12"),
        ("The final answer is $\\frac{1}{2}$.\nThanks", "\\frac{1}{2}"),
        ("the answer is 4. Wait, the answer is 5.", "5"),
        ("**Answer:** 1, 2, 3", "1, 2, 3"),
        ("She pays 3 * 6 = 18.\n#### 1,234", "1234"),
        ("3 apples cost -2,500.75 dollars overall", "-2500.75"),
        ("no digits at all", None),
        ("", None),
        ("   \n ", None),
        ("so \\boxed{\\frac{1}{", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("gold", GOLDS)
def test_real_gold_boxed_is_correct(gold: str) -> None:
    assert is_correct(boxed(gold), gold)


@pytest.mark.parametrize(("gold", "equivalent"), [(g, e) for g, e, _ in REAL_ANSWERS])
def test_real_gold_equivalent_form_is_correct(gold: str, equivalent: str) -> None:
    assert is_correct(boxed(equivalent), gold)


@pytest.mark.parametrize(("gold", "wrong"), [(g, w) for g, _, w in REAL_ANSWERS])
def test_real_gold_near_miss_is_wrong(gold: str, wrong: str) -> None:
    assert not is_correct(boxed(wrong), gold)


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{9/32}", "\\frac{9}{32}", True),
        ("\\boxed{0.5}", "\\frac12", True),
        ("The answer is 73.", "073", True),
        ("#### 18", "18", True),
        ("\\boxed{8 \\pi}", "8\\pi", True),
        ("\\boxed{(1,2)}", "(1, 2)", True),
        ("\\boxed{(2,1)}", "(1, 2)", False),
        ("\\boxed{25.13}", "8\\pi", False),
    ],
)
def test_hand_written_equivalences(completion: str, gold: str, expected: bool) -> None:
    assert is_correct(completion, gold) is expected


def test_fast_path_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> bool:
        raise AssertionError("math-verify must not run for a normalised string match")

    monkeypatch.setattr(grader, "_check_with_alarm", fail)
    completion = "$\\boxed{\\left( 3, \\frac{\\pi}{2}\\!\\right)}$."
    assert is_correct(completion, "\\left( 3, \\frac{\\pi}{2} \\right)")


@pytest.mark.parametrize("completion", ["", "   ", "The probability is \\boxed{\\frac{1}{", None])
def test_empty_or_truncated_completion_is_wrong(completion: str) -> None:
    assert is_correct(completion, "\\frac{1}{576}") is False


@pytest.mark.parametrize("gold", ["", "  \n", None])
def test_empty_gold_raises(gold: str) -> None:
    with pytest.raises(ValueError, match="gold answer"):
        is_correct(boxed("1"), gold)


@pytest.mark.parametrize("completion", PATHOLOGICAL)
def test_pathological_input_is_bounded(completion: str) -> None:
    start = time.monotonic()
    assert is_correct(completion, "5") is False
    assert time.monotonic() - start < 15


def test_main_thread_check_restores_sigalrm_state() -> None:
    def handler(signum: int, frame: object) -> None:
        raise AssertionError("the grader's timer leaked")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert is_correct(boxed("9/32"), "\\frac{9}{32}")
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        signal.setitimer(signal.ITIMER_REAL, 60.0)  # a caller's own pending timer survives
        assert is_correct(boxed("18/64"), "\\frac{9}{32}")
        assert 50.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_in_thread(fn: object) -> object:
    """Runs ``fn()`` in a fresh non-main thread and returns its result (or re-raises)."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # re-raised in the test thread
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "worker thread hung"
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_non_main_thread_gives_right_answers() -> None:
    cases = [(boxed(e), g, True) for g, e, _ in REAL_ANSWERS[:6]]
    cases += [(boxed(w), g, False) for g, _, w in REAL_ANSWERS[:6]]
    results = run_in_thread(lambda: [is_correct(c, g) for c, g, _ in cases])
    assert results == [expected for _, _, expected in cases]


def test_non_main_thread_pathological_input_is_bounded() -> None:
    def check() -> tuple[bool, float]:
        is_correct(boxed("1/2"), "0.5")  # start the worker outside the timed call
        start = time.monotonic()
        return is_correct("\\boxed{9^{9^{9^{9}}}}", "5", timeout_s=1.0), time.monotonic() - start

    result, elapsed = run_in_thread(check)
    assert result is False
    assert elapsed < 15


def test_hung_worker_is_killed_and_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller gives up 2.5 s before the worker's own alarm, so it must kill the worker.
    monkeypatch.setattr(grader, "_KILL_GRACE_S", -2.5)

    def check() -> tuple[bool, float, bool]:
        is_correct(boxed("1/2"), "0.5")
        start = time.monotonic()
        hung = is_correct("\\boxed{9^{9^{9^{9}}}}", "5", timeout_s=3.0)
        elapsed = time.monotonic() - start
        return hung, elapsed, is_correct(boxed("9/32"), "\\frac{9}{32}", timeout_s=3.0)

    hung, elapsed, after_restart = run_in_thread(check)
    assert hung is False
    assert elapsed < 2.0  # killed at 0.5 s, not left to the worker's 3 s alarm
    assert after_restart is True


def test_math_verifier_grades_a_batch_as_is_correct_and_extract_answer_do() -> None:
    completions = ["so \\boxed{1/2}", "so \\boxed{3}", "no answer here", "then \\boxed{7}"]
    references = ["0.5", "0.5", "0.5", None]
    verdicts = grader.MathVerifier().grade(completions, references)
    # 1/2 == 0.5 by math-verify; 3 != 0.5; nothing extracted is wrong; no reference: no grade, the answer kept
    assert verdicts == [Verdict(True, "1/2"), Verdict(False, "3"), Verdict(False, None), Verdict(None, "7")]
    assert grader.MathVerifier().majority_vote


def test_math_verifier_takes_its_check_and_extraction_as_callables() -> None:
    def even_length(completion: str, answer: str) -> bool:
        return len(completion) % 2 == 0

    def first_character(completion: str) -> str | None:
        return completion[:1] or None

    verdicts = grader.MathVerifier(even_length, first_character).grade(["ab", "abc", ""], ["x", "x", None])
    assert verdicts == [Verdict(True, "a"), Verdict(False, "a"), Verdict(None, None)]
    with pytest.raises(ValueError):  # one reference per completion
        grader.MathVerifier().grade(["a", "b"], ["1"])

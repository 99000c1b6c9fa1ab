"""EvalPlus 0.3.1's verdict on a program's outputs, one stage at a time (evalplus/eval/__init__.py).

`StageCheck` reads the harness's reports of one stage as they come and stops at the first
failing test (EvalPlus's fast check). An output passes when `out == expected`, with MBPP's
special oracles by entry point (surface_Area and digit_distance_nums also accept their
oracle's answer, the set tasks compare `set(out)`, check_str / text_match_three /
text_starta_endb only "is not None"; are_equivalent and sum_div are not in MBPP+ v0.2.0),
and a float tolerance (the task's atol, or 1e-6 once a float output was expected, kept for
the rest of the stage, as in EvalPlus) for outputs of the same type and length.
HumanEval/32 (find_zero) never passes: EvalPlus 0.3.1 checks |poly(x)| <= atol but its
`continue` skips recording the pass, so its canonical solution fails too.

Differences, by design: outputs are compared here, outside the sandbox, so an object whose
`__eq__` always says True does not pass; an output with the expected output's digest
passes without being sent (`harness.equal_by_digest`), and one too large to keep
(`Expected.value` raises LookupError) can only match by digest.
"""

from __future__ import annotations

import json
import math

import numpy as np

from renio_pl.evaluators import harness
from renio_pl.evaluators.code_problems import Expected, Problem


__all__ = ["StageCheck", "MBPP_SET_EQ", "MBPP_NOT_NONE", "MBPP_ORACLES"]

# MBPP tasks with special oracles (evalplus/eval/_special_oracle.py, keyed by entry point).
MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
               "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
MBPP_ORACLES = {"are_equivalent", "sum_div", "surface_Area", "digit_distance_nums"}


class StageCheck:
    """Checks one stage's reports as they come, with EvalPlus 0.3.1's rules; stops at the first failure."""

    def __init__(self, dataset: str, problem: Problem, stage: str, expected: Expected) -> None:
        self.dataset, self.problem, self.expected = dataset, problem, expected
        self.inputs = problem.inputs[stage]
        self.atol = problem.atol
        self.passed = 0  # calls passed so far, in order
        self.reason: str | None = None  # "fail" or "timeout" once a call failed
        self.pending: tuple[str, int] | None = None  # the next line is call i's value: ("check" | "skip", i)
        special = MBPP_SET_EQ | MBPP_NOT_NONE | MBPP_ORACLES if dataset == "mbpp" else {"find_zero"}
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
                elif name in MBPP_SET_EQ:
                    exact = set(out) == set(exp)
                elif name in MBPP_NOT_NONE:
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

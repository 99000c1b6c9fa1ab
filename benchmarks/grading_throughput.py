"""Grading throughput (completions per second) of `renio_pl.evaluators.math.is_correct` on CPU.

Completions are built from the gold answers of HMMT Feb 2025, AIME 2024 and MATH-500 in
evaluation/data (560 problems): a worked-solution body (the problem restated plus arithmetic
steps, about --body-chars characters) followed by, per case,
  correct    "... the final answer is \\boxed{gold}"
  wrong      "... \\boxed{other}", with the gold answer of another problem (a different string)
  no-box     "... the final answer is $gold$." (the text fallback, no box)
  truncated  the body cut off inside "\\boxed{" + half the gold (falls back to the last number)
Each case is timed over all 560 problems after one warm-up check, with math-verify's parse
cache cleared before it, so each gold is parsed once per case (as for the first of a prompt's
samples). Grading runs in the main thread (the in-process time bound), as the data module
calls it. `judged correct` is a sanity column: near 100% for correct and 0% for wrong.

    python benchmarks/grading_throughput.py [--body-chars 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from renio_pl.evaluators import math as grader

DATA = Path(__file__).resolve().parents[1] / "evaluation" / "data" / "math"
FILES = ["hmmt_feb25_matharena.jsonl", "aime24_matharena.jsonl", "math500_deepscaler.jsonl"]


def load_problems() -> list[tuple[str, str]]:
    """(problem, gold answer) pairs of the three benchmarks, in file order."""
    rows = [json.loads(line) for name in FILES for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [(row["problem"], str(row["answer"])) for row in rows]


def body(problem: str, index: int, chars: int) -> str:
    """A solution-like body: the problem restated, then numbered arithmetic steps, about `chars` long."""
    text = f"Let me restate the problem. {problem}\n\nWe work step by step.\n"
    step = 0
    while len(text) < chars:
        step += 1
        a, b = 3 * step + index % 17, 7 * step + index % 5
        text += f"Step {step}: from the previous line, ${a} \\cdot {b} = {a * b}$ and $\\frac{{{a * b}}}{{{b}}} = {a}$.\n"
    return text


def completions(problems: list[tuple[str, str]], chars: int) -> dict[str, list[tuple[str, str]]]:
    """Per case, the (completion, gold) pairs to grade."""
    cases: dict[str, list[tuple[str, str]]] = {"correct": [], "wrong": [], "no-box": [], "truncated": []}
    golds = [gold for _, gold in problems]
    for i, (problem, gold) in enumerate(problems):
        text = body(problem, i, chars)
        other = next(g for g in golds[i + 1 :] + golds[:i] if grader._normalise(g) != grader._normalise(gold))
        cases["correct"].append((f"{text}Therefore the final answer is \\boxed{{{gold}}}.", gold))
        cases["wrong"].append((f"{text}Therefore the final answer is \\boxed{{{other}}}.", gold))
        cases["no-box"].append((f"{text}Therefore the final answer is ${gold}$.", gold))
        cases["truncated"].append((f"{text}Therefore the final answer is \\boxed{{{gold[: len(gold) // 2]}", gold))
    return cases


def time_case(pairs: list[tuple[str, str]]) -> tuple[float, int]:
    """Seconds to grade all pairs (cold parse cache) and how many were judged correct."""
    grader._parse_latex.cache_clear()
    start = time.perf_counter()
    right = sum(grader.is_correct(completion, gold) for completion, gold in pairs)
    return time.perf_counter() - start, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body-chars", type=int, default=2000, help="length of the solution body before the answer")
    args = parser.parse_args()
    cases = completions(load_problems(), args.body_chars)
    grader.is_correct("so the answer is \\boxed{\\frac{1}{2}}", "0.5")  # warm-up: imports, grammar
    results = {case: time_case(pairs) for case, pairs in cases.items()}
    print(f"is_correct on {len(cases['correct'])} problems x {len(cases)} cases, body ~{args.body_chars} chars:")
    print(f"  {'case':<10} {'checks':>7} {'seconds':>8} {'completions/s':>14} {'judged correct':>15}")
    for case, (seconds, right) in results.items():
        checks = len(cases[case])
        print(f"  {case:<10} {checks:>7} {seconds:>8.2f} {checks / seconds:>14.1f} {100 * right / checks:>14.1f}%")
    checks, seconds = sum(len(pairs) for pairs in cases.values()), sum(s for s, _ in results.values())
    print(f"  {'overall':<10} {checks:>7} {seconds:>8.2f} {checks / seconds:>14.1f}")


if __name__ == "__main__":
    main()

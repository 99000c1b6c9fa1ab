"""HumanEval+ / MBPP+ grading: EvalPlus 0.3.1's verdicts on real programs, run in the real sandbox.

`CASES` exercises each comparison rule (float tolerance, MBPP's set / not-None / oracle
tasks, find_zero, numpy outputs, int-for-float, large outputs compared by value) and each
failure kind. `EVALPLUS` pins EvalPlus 0.3.1's own (base, plus) verdict on every case,
recorded with

    /tmp/evalplus-venv/bin/python benchmarks/code_eval.py evalplus-check DATASET < cases.jsonl

(`pip install evalplus==0.3.1` in that venv); `test_agrees_with_evalplus_run_now` reruns
that comparison when such a Python is at hand (RENIO_PL_EVALPLUS_PYTHON, or evalplus
importable here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from renio_pl.errors import ConfigError
from renio_pl.evaluators import code, code_expected, code_problems
from renio_pl.evaluators.code import evaluate_solutions, load_problems
from renio_pl.evaluators.verifier import Verdict

REPO = Path(__file__).resolve().parents[1]


def canonical(task_id: str) -> str:
    dataset = "humaneval" if task_id.startswith("HumanEval/") else "mbpp"
    return load_problems(dataset)[task_id].canonical


# (label, task_id, program); None as program means the task's canonical solution.
CASES = [
    ("he0 canonical", "HumanEval/0", None),
    ("he0 always true", "HumanEval/0", "def has_close_elements(numbers, threshold):\n    return True"),
    ("he2 canonical", "HumanEval/2", None),
    ("he2 error 1e-9 within atol", "HumanEval/2", "def truncate_number(number):\n    return number % 1.0 + 1e-9"),
    ("he2 error 1e-4 beyond atol", "HumanEval/2", "def truncate_number(number):\n    return number % 1.0 + 1e-4"),
    ("he4 numpy float64", "HumanEval/4", """
        import numpy as np
        def mean_absolute_deviation(numbers):
            a = np.array(numbers)
            return np.mean(np.abs(a - np.mean(a)))"""),
    ("he13 float for int", "HumanEval/13", """
        from math import gcd
        def greatest_common_divisor(a, b):
            return 1.0 * gcd(a, b)"""),
    ("he13 str for int", "HumanEval/13", """
        from math import gcd
        def greatest_common_divisor(a, b):
            return str(gcd(a, b))"""),
    ("he22 typing name not imported", "HumanEval/22",
     "def filter_integers(values: List[Any]) -> List[int]:\n    return [v for v in values if type(v) is int]"),
    ("he22 typing names imported", "HumanEval/22", """
        from typing import Any, List
        def filter_integers(values: List[Any]) -> List[int]:
            return [v for v in values if type(v) is int]"""),
    ("he32 canonical", "HumanEval/32", None),
    ("he45 error 1e-9, atol 0 but floats", "HumanEval/45", "def triangle_area(a, h):\n    return a * h / 2.0 + 1e-9"),
    ("he45 error 1e-5", "HumanEval/45", "def triangle_area(a, h):\n    return a * h / 2.0 + 1e-5"),
    ("he53 canonical", "HumanEval/53", None),
    ("he53 eq always true", "HumanEval/53", """
        class Anything:
            def __eq__(self, other):
                return True
        def add(x, y):
            return Anything()"""),
    ("he53 infinite loop", "HumanEval/53", "def add(x, y):\n    while True:\n        pass"),
    ("he53 syntax error", "HumanEval/53", "def add(x, y) return x + y"),
    ("he53 no entry point", "HumanEval/53", "def plus(x, y):\n    return x + y"),
    ("he53 exit at load", "HumanEval/53", "def add(x, y):\n    return x + y\nexit()"),
    ("he53 opens a file", "HumanEval/53", "def add(x, y):\n    open('notes.txt', 'w')\n    return x + y"),
    ("he53 prints", "HumanEval/53", "def add(x, y):\n    print('x' * 10000)\n    return x + y"),
    ("he53 wrong on plus", "HumanEval/53", "def add(x, y):\n    return x + y if abs(x) < 1000 else 0"),
    ("he100 floats for ints", "HumanEval/100", "def make_a_pile(n):\n    return [float(n + 2 * i) for i in range(n)]"),
    ("he100 tuple for list", "HumanEval/100", "def make_a_pile(n):\n    return tuple(n + 2 * i for i in range(n))"),
    ("mbpp2 canonical", "Mbpp/2", None),
    ("mbpp2 set for tuple", "Mbpp/2", "def similar_elements(a, b):\n    return set(a) & set(b)"),
    ("mbpp2 union", "Mbpp/2", "def similar_elements(a, b):\n    return tuple(set(a) | set(b))"),
    ("mbpp7 sorted unique", "Mbpp/7", """
        import re
        def find_char_long(text):
            return sorted(set(re.findall(r'\\b\\w{4,}\\b', text)))"""),
    ("mbpp82 canonical", "Mbpp/82", None),
    ("mbpp82 other float order", "Mbpp/82", "import math\ndef volume_sphere(r):\n    return 4 * math.pi * r**3 / 3"),
    ("mbpp82 int", "Mbpp/82", "import math\ndef volume_sphere(r):\n    return int(4 / 3 * math.pi * r ** 3)"),
    ("mbpp252 canonical", "Mbpp/252", None),
    ("mbpp580 canonical", "Mbpp/580", None),
    ("mbpp722 canonical", "Mbpp/722", None),
    ("mbpp124 canonical", "Mbpp/124", None),
    ("mbpp124 error 5e-5", "Mbpp/124", "import cmath\ndef angle_complex(a, b):\n    return cmath.phase(a + b) + 5e-5"),
    ("mbpp140 list", "Mbpp/140", "def extract_singly(lists):\n    return sorted({x for xs in lists for x in xs})"),
    ("mbpp558 canonical", "Mbpp/558", None),
    ("mbpp558 zero padded", "Mbpp/558", """
        def digit_distance_nums(n1, n2):
            a, b = str(n1), str(n2)
            width = max(len(a), len(b))
            return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(width), b.zfill(width)))"""),
    ("mbpp581 canonical", "Mbpp/581", None),
    ("mbpp581 pyramid height", "Mbpp/581", """
        import math
        def surface_Area(b, s):
            return round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + s ** 2))"""),
    ("mbpp737 canonical", "Mbpp/737", None),
    ("mbpp737 bool", "Mbpp/737", """
        import re
        def check_str(string):
            return bool(re.search('^[aeiouAEIOU][A-Za-z0-9_]*', string))"""),
    ("mbpp737 always none", "Mbpp/737", "def check_str(string):\n    return None"),
    ("mbpp737 always str", "Mbpp/737", "def check_str(string):\n    return 'yes'"),
    ("mbpp769 canonical", "Mbpp/769", None),
]
# EvalPlus 0.3.1's (base passed, base and plus passed) on each case (module docstring: how).
EVALPLUS = {
    "he0 canonical": (True, True),
    "he0 always true": (False, False),
    "he22 typing name not imported": (False, False),  # annotations are evaluated: NameError
    "he22 typing names imported": (True, True),
    "he2 canonical": (True, True),
    "he2 error 1e-9 within atol": (True, True),
    "he2 error 1e-4 beyond atol": (False, False),
    "he4 numpy float64": (True, False),
    "he13 float for int": (True, True),
    "he13 str for int": (False, False),
    "he32 canonical": (False, False),
    "he45 error 1e-9, atol 0 but floats": (True, True),
    "he45 error 1e-5": (False, False),
    "he53 canonical": (True, True),
    "he53 eq always true": (True, True),
    "he53 infinite loop": (False, False),
    "he53 syntax error": (False, False),
    "he53 no entry point": (False, False),
    "he53 exit at load": (False, False),
    "he53 opens a file": (False, False),
    "he53 prints": (True, True),
    "he53 wrong on plus": (True, False),
    "he100 floats for ints": (True, True),
    "he100 tuple for list": (False, False),
    "mbpp2 canonical": (True, True),
    "mbpp2 set for tuple": (True, True),
    "mbpp2 union": (False, False),
    "mbpp7 sorted unique": (True, True),
    "mbpp82 canonical": (True, True),
    "mbpp82 other float order": (True, True),
    "mbpp82 int": (False, False),
    "mbpp252 canonical": (True, True),
    "mbpp580 canonical": (True, True),
    "mbpp722 canonical": (True, True),
    "mbpp124 canonical": (True, True),
    "mbpp124 error 5e-5": (True, True),
    "mbpp140 list": (True, True),
    "mbpp558 canonical": (True, True),
    "mbpp558 zero padded": (True, True),
    "mbpp581 canonical": (True, True),
    "mbpp581 pyramid height": (True, True),
    "mbpp737 canonical": (True, True),
    "mbpp737 bool": (True, True),
    "mbpp737 always none": (False, False),
    "mbpp737 always str": (False, False),
    "mbpp769 canonical": (True, True),
}
# Where we differ from EvalPlus by design (code_oracles.py docstring): a lying __eq__ does not pass here.
DIVERGES = {"he53 eq always true": (False, False)}


def solutions() -> list[dict]:
    return [{"task_id": task, "solution": canonical(task) if program is None else textwrap.dedent(program).strip()}
            for _, task, program in CASES]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh expected-output cache for this module's runs."""
    folder = tmp_path_factory.mktemp("renio_pl_cache")
    previous = os.environ.get("RENIO_PL_CACHE")
    os.environ["RENIO_PL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["RENIO_PL_CACHE"]
    else:
        os.environ["RENIO_PL_CACHE"] = previous


@pytest.fixture(scope="module")
def graded(cache) -> dict[str, dict]:
    """Our verdict on every case, graded in one call (both datasets), by label."""
    results = {}
    for dataset, prefix in (("humaneval", "HumanEval/"), ("mbpp", "Mbpp/")):
        chosen = [(label, s) for (label, task, _), s in zip(CASES, solutions()) if task.startswith(prefix)]
        for (label, _), result in zip(chosen, evaluate_solutions([s for _, s in chosen], dataset, workers=2)):
            results[label] = result
    return results


def test_verdicts_equal_evalplus_recorded_ones(graded):
    ours = {label: (r["base_passed"], r["plus_passed"]) for label, r in graded.items()}
    expected = {**EVALPLUS, **DIVERGES}
    assert ours == expected


def test_statuses_say_which_stage_failed_and_why(graded):
    assert graded["he53 canonical"] == {"task_id": "HumanEval/53", "base_passed": True, "plus_passed": True,
                                        "status": "pass"}
    assert graded["he53 infinite loop"]["status"] == "base:timeout"
    assert graded["he53 syntax error"]["status"] == graded["he53 no entry point"]["status"] == "base:fail"
    assert graded["he53 wrong on plus"]["status"] == "plus:fail"
    assert graded["he32 canonical"]["status"] == "base:fail"  # EvalPlus 0.3.1 never passes find_zero


def evalplus_python() -> str | None:
    if os.environ.get("RENIO_PL_EVALPLUS_PYTHON"):
        return os.environ["RENIO_PL_EVALPLUS_PYTHON"]
    return sys.executable if importlib.util.find_spec("evalplus") else None


@pytest.mark.skipif(evalplus_python() is None, reason="evalplus 0.3.1 not importable, RENIO_PL_EVALPLUS_PYTHON unset")
def test_agrees_with_evalplus_run_now(graded):
    theirs = {}
    for dataset, prefix in (("humaneval", "HumanEval/"), ("mbpp", "Mbpp/")):
        chosen = [(label, s) for (label, task, _), s in zip(CASES, solutions()) if task.startswith(prefix)]
        done = subprocess.run(
            [evalplus_python(), str(REPO / "benchmarks" / "code_eval.py"), "evalplus-check", dataset],
            input="".join(json.dumps(s) + "\n" for _, s in chosen), capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        for (label, _), line in zip(chosen, done.stdout.splitlines()):
            verdict = json.loads(line)
            theirs[label] = (verdict["base"] == "pass", verdict["base"] == verdict["plus"] == "pass")
    ours = {label: (r["base_passed"], r["plus_passed"]) for label, r in graded.items()}
    for label in DIVERGES:
        del ours[label], theirs[label]
    assert ours == theirs
    assert theirs == {k: v for k, v in EVALPLUS.items() if k not in DIVERGES}  # the recorded figures hold


def test_expected_outputs_are_cached_per_data_file_and_task(graded, cache):
    folders = list((cache / "code_expected" / "v1").iterdir())
    assert sorted(folder.name for folder in folders) == sorted(
        code_expected._sha256(code.DATA_DIR / name) for name in code.DATASETS.values()
    )
    computed = sorted(path.stem for folder in folders for path in folder.glob("*.json"))
    assert computed == sorted({task.replace("/", "_") for _, task, _ in CASES})  # only the tasks asked for
    cached = {path: path.stat().st_mtime_ns for path in cache.rglob("*.json")}
    started = time.monotonic()
    again = evaluate_solutions([{"task_id": "HumanEval/53", "solution": canonical("HumanEval/53")}], "humaneval")
    assert again[0]["plus_passed"] and time.monotonic() - started < 10
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.json")} == cached  # read, not recomputed


def test_hostile_solutions_are_contained_and_fail_alone(cache):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    data_file = str(code.DATA_DIR / code.DATASETS["humaneval"])
    # Each would pass if the sandbox leaked (io.open and ctypes get round EvalPlus's guard).
    leaks = [
        f"import io\ndef add(x, y):\n    io.open({data_file!r}, 'rb').read(1)\n    return x + y",
        f"import socket\ndef add(x, y):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
        "    return x + y",
    ]
    crashes = [
        "import ctypes\ndef add(x, y):\n    ctypes.string_at(0)",  # segfault
        "blob = bytearray(8 << 30)\ndef add(x, y):\n    return x + y",  # over the 4 GiB address space
    ]
    contained = [  # aimed at the evaluator; harmless in the jail, so the program may still pass
        "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.kill(libc.getppid(), 9)\nlibc.kill(-1, 9)\n"
        "def add(x, y):\n    return x + y",
    ]
    programs = leaks + crashes + contained + [canonical("HumanEval/53")]
    results = evaluate_solutions([{"task_id": "HumanEval/53", "solution": p} for p in programs], "humaneval", workers=2)
    listener.close()
    passed = [r["plus_passed"] for r in results]
    assert passed[: len(leaks) + len(crashes)] == [False] * (len(leaks) + len(crashes))
    assert passed[-1] and len(results) == len(programs)


@pytest.mark.parametrize(
    ("solutions", "dataset", "workers", "message"),
    [
        ([], "humaneval+", 1, "dataset must be one of humaneval, mbpp; got 'humaneval\\+'"),
        ([{"task_id": "HumanEval/999", "solution": ""}], "humaneval", 1,
         "solutions\\[0\\]: unknown humaneval task_id 'HumanEval/999'; ids run from 'HumanEval/0' to 'HumanEval/163'"),
        ([{"task_id": "Mbpp/2"}], "mbpp", 1, "solutions\\[0\\] must be a dict with a 'task_id' and a 'solution'"),
        ([{"task_id": "Mbpp/2", "solution": "x"}], "mbpp", 0, "workers must be a positive integer; got 0"),
    ],
)
def test_bad_input_is_a_one_line_config_error(solutions, dataset, workers, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_solutions(solutions, dataset, workers=workers)


def test_tampered_data_fails_its_sha256_check(tmp_path, monkeypatch):
    source = code.DATA_DIR / code.DATASETS["mbpp"]
    (tmp_path / "code").mkdir()
    data = bytearray(source.read_bytes())
    data[1000] ^= 1
    (tmp_path / "code" / source.name).write_bytes(bytes(data))
    sums = (code.DATA_DIR.parent / "SHA256SUMS").read_text()
    (tmp_path / "SHA256SUMS").write_text(sums)
    monkeypatch.setattr(code_problems, "DATA_DIR", tmp_path / "code")
    code.load_problems.cache_clear()
    try:
        with pytest.raises(ConfigError, match="does not match its sha256 in .*SHA256SUMS"):
            load_problems("mbpp")
    finally:
        code.load_problems.cache_clear()


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes_but_find_zero(tmp_path, monkeypatch):
    """All 164 tasks from a cold cache (65-80 s on 2 cores; with MBPP+ it would take over 4 minutes:
    benchmarks/code_eval.py runs both). A verdict that hinges on time may flip on a loaded
    machine, for EvalPlus as for us, so a timeout is tolerated; a wrong-output failure is not."""
    monkeypatch.setenv("RENIO_PL_CACHE", str(tmp_path))
    problems = load_problems("humaneval")
    results = evaluate_solutions([{"task_id": t, "solution": p.canonical} for t, p in problems.items()], "humaneval",
                                 workers=2)
    failed = {r["task_id"]: r["status"] for r in results if not r["plus_passed"]}
    assert failed.pop("HumanEval/32") == "base:fail"
    assert all(status.endswith(":timeout") for status in failed.values()) and len(failed) <= 2, failed


# ---------------------------------------------------------------- completions -> programs -> verdicts

HE0 = load_problems("humaneval")["HumanEval/0"]


def test_extract_program_takes_the_answer_block_and_keeps_definitions():
    completion = (
        "<think>First try:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\n</think>"
        "Here it is:\n```python\nimport math\n\ndef has_close_elements(numbers, threshold):\n    return True\n\n"
        "print(has_close_elements([1.0], 0.5))\nif __name__ == '__main__':\n    input()\n```\n"
        "And a usage example:\n```python\nhas_close_elements([], 1.0)\n```\n"
    )
    assert code.extract_program(completion, HE0.prompt, HE0.entry_point) == (
        "import math\n\ndef has_close_elements(numbers, threshold):\n    return True\n"
    )
    # a base model's continuation of the prompt: the program is prompt + completion
    body = "    return True\n"
    assert code.extract_program(body, HE0.prompt, HE0.entry_point).endswith('"""\n    return True\n')
    # a block cut off at the end of the budget is still taken (and fails to parse: returned whole)
    cut = "```python\ndef has_close_elements(numbers, threshold):\n    return ("
    assert code.extract_program(cut, HE0.prompt, HE0.entry_point) == cut.removeprefix("```python\n")


def test_code_verifier_grades_model_completions_in_the_sandbox(cache):
    he2 = load_problems("humaneval")["HumanEval/2"]
    canonical_body = he2.canonical.removeprefix(he2.prompt)
    completions = [
        f"<think>easy</think>\n```python\n{he2.canonical}\nprint(truncate_number(3.5))\n```",  # chat style: pass
        canonical_body,  # continuation style: pass
        "```python\ndef truncate_number(number):\n    return number\n```",  # wrong: base tests fail
        "I do not know.",  # no code
    ]
    verdicts = code.CodeVerifier("humaneval", workers=2).grade(completions, ["HumanEval/2"] * 4)
    assert [(v.correct, v.detail) for v in verdicts] == [
        (True, "pass"), (True, "pass"), (False, "base:fail"), (False, "base:fail"),
    ]
    assert all(v.final_answer is None for v in verdicts)  # nothing to vote on
    with pytest.raises(ConfigError, match="'2' is not a humaneval task id; set the test set's answer_field to task_id"):
        code.CodeVerifier("humaneval").grade(["x"], ["2"])
    with pytest.raises(ConfigError, match="dataset must be one of humaneval, mbpp; got 'apps'"):
        code.CodeVerifier("apps")


def test_code_verifier_leaves_completions_without_a_task_id_ungraded():
    # nothing runs for them: `renio-pl predict` on prompts without an answer column
    verdicts = code.CodeVerifier("humaneval").grade(["def add(x, y):\n    return x + y", "x"], [None, None])
    assert verdicts == [Verdict(None), Verdict(None)]


def test_benchmark_rows_load_from_the_gzipped_release_files():
    from renio_pl.prompts import load_rows

    for dataset, count in (("humaneval", 164), ("mbpp", 378)):
        path = code.DATA_DIR / code.DATASETS[dataset]
        rows = load_rows(str(path), "prompt", "task_id", "test", "data.test_sets[0].path")
        problems = load_problems(dataset)
        assert len(rows) == count and [row.answer for row in rows] == list(problems)
        assert all(row.problem == problems[row.answer].prompt for row in rows)


def run_code_test(model_dirs, out: Path, devices: int, cache: Path) -> dict:
    """`renio-pl test` with the shipped HumanEval+ config, cut down to a tiny model and 3 tasks."""
    override = {
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": ""}},
        },
        "model": {"student": str(model_dirs["student"]), "dtype": "float32"},
        "data": {
            "test_sampling": {"n": 4, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8},
            "test_sets": [{
                "name": "humaneval_plus", "path": "evaluation/data/code/HumanEvalPlus-v0.1.10.jsonl.gz",
                "prompt_field": "prompt", "answer_field": "task_id", "limit": 3,
                "prompt_format": {"template": "Solve:\n```\n{problem}\n```\n"},
                "verifier": {"class_path": "renio_pl.evaluators.code.CodeVerifier",
                             "init_args": {"dataset": "humaneval", "workers": 2}},
            }],
        },
    }
    out.mkdir(parents=True)
    (out / "override.yaml").write_text(json.dumps(override))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RENIO_PL_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-m", "renio_pl.cli", "test", "--config", "configs/eval/humaneval_plus.yaml",
         "--config", str(out / "override.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| humaneval_plus | 3 |" in result.stdout
    return json.loads(next(out.glob("**/eval/humaneval_plus.json")).read_text())


@pytest.mark.slow
def test_test_command_runs_the_code_benchmark_on_one_and_two_processes(model_dirs, tmp_path, cache):
    one = run_code_test(model_dirs, tmp_path / "one", 1, cache)
    two = run_code_test(model_dirs, tmp_path / "two", 2, cache)
    assert one == two  # same samples, same verdicts, no task counted twice or dropped
    assert set(one["metrics"]) == {"avg@4", "pass@4"}  # no maj@4: programs are not voted on
    assert [p["answer"] for p in one["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    samples = [s for p in one["problems"] for s in p["samples"]]
    assert len(samples) == 12
    # a random-weight model writes no working code: every sample ran and failed its base tests
    assert {s["verdict"] for s in samples} == {"base:fail"} and one["metrics"]["avg@4"] == 0.0

"""Avg@k, pass@k and majority vote by hand; `renio-pl test` end to end, on 1 and on 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
import torch

from renio_pl.evaluators.accuracy import accuracy_metrics, compute_accuracy, update_accuracy
from renio_pl.evaluators.metrics import AvgAtK, MajorityVote, NothingGraded, PassAtK, answer_key
from renio_pl.rollouts import Rollout

REPO = Path(__file__).resolve().parents[1]


def feed(metric, rows: list[tuple[int, int, bool, str | None]]):
    problem, sample, correct, answer = zip(*rows)
    metric.update(torch.tensor(problem), torch.tensor(sample), torch.tensor(correct),
                  torch.tensor([answer_key(a) for a in answer], dtype=torch.float64))
    return metric


# problem 0: 1 of 3 right; problem 1: 3 of 3; problem 2: 0 of 3 (records given out of order)
TABLE = [
    (1, 2, True, "7"), (0, 0, False, "4"), (2, 1, False, "9"), (0, 1, True, "5"), (1, 0, True, "7"),
    (2, 0, False, None), (0, 2, False, "4"), (1, 1, True, "7"), (2, 2, False, "8"),
]


def test_avg_at_k_by_hand():
    assert float(feed(AvgAtK(), TABLE).compute()) == pytest.approx((1 / 3 + 1 + 0) / 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pass_at_k_matches_the_binomial_formula(k):
    expected = sum(1 - comb(3 - c, k) / comb(3, k) for c in (1, 3, 0)) / 3
    assert float(feed(PassAtK(k), TABLE).compute()) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        feed(PassAtK(4), TABLE).compute()


def test_majority_vote_by_hand():
    # problem 0: "4" twice (wrong) beats "5" -> wrong; problem 1: "7" -> right;
    # problem 2: "9" and "8" tie once each (None does not vote) -> first seen, "9" at sample 1 -> wrong
    assert float(feed(MajorityVote(), TABLE).compute()) == pytest.approx(1 / 3)
    tie = [(0, 0, True, "1"), (0, 1, False, "2"), (0, 2, False, " 2 "), (0, 3, True, "1")]
    assert float(feed(MajorityVote(), tie).compute()) == 1.0  # tie 2-2: "1" was seen first
    silent = [(0, 0, True, None), (0, 1, True, None)]
    assert float(feed(MajorityVote(), silent).compute()) == 0.0  # no votes: wrong


def test_records_counted_twice_or_missing_are_errors():
    with pytest.raises(ValueError, match="problem 0 sample 1 was graded more than once"):
        feed(AvgAtK(), [(0, 0, True, "1"), (0, 1, True, "1"), (0, 1, True, "1"), (1, 0, True, "1")]).compute()
    with pytest.raises(ValueError, match="problem 1 has 1 samples, others 2"):
        feed(AvgAtK(), [(0, 0, True, "1"), (0, 1, True, "1"), (1, 0, True, "1")]).compute()
    with pytest.raises(NothingGraded):
        AvgAtK().compute()


def test_collection_from_rollouts_skips_ungraded():
    metrics = accuracy_metrics(2, pass_at_k=[1, 2, 5])
    assert set(metrics.keys()) == {"avg@2", "maj@2", "pass@2"}
    rollouts = [
        Rollout([1], [2], 0, 1.0, 0, "3", True, r"\boxed{3}", "3"),
        Rollout([1], [2], 0, 1.0, 1, "3", False, r"\boxed{4}", "4"),
        Rollout([1], [2], 1, 1.0, 0, None, None, "x", None),  # no answer: not graded
    ]
    update_accuracy(metrics, rollouts, torch.device("cpu"))
    assert compute_accuracy(metrics) == {"avg@2": 0.5, "maj@2": 1.0, "pass@2": 1.0}
    assert compute_accuracy(metrics) == {}  # reset after compute; nothing graded now


VERIFIER = "tests.test_evaluation.even_code_sum"


def even_code_sum(completion: str, answer: str) -> bool:
    """A verifier with mixed verdicts on a random-weight model's output (parity of its code points)."""
    return sum(map(ord, completion)) % 2 == 0


def first_character(completion: str) -> str | None:
    return completion[:1] or None


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    files = {}
    for name, count in (("seven", 7), ("three", 3)):  # odd sizes: uneven across 2 processes
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"problem": f"{i}*{i}=", "answer": str(i * i)}) + "\n" for i in range(count)))
    return files


def run_test(model_dirs, benchmark_files, out: Path, devices: int) -> dict:
    config = {
        "seed_everything": 0,
        "verbose": False,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": ""}},
            "callbacks": [{"class_path": "renio_pl.callbacks.EvaluationReport"}],
        },
        "model": {"student": str(model_dirs["student"]), "pass_at_k": [2]},
        "data": {
            "test_sets": [{"name": name, "path": str(path)} for name, path in benchmark_files.items()],
            "test_sampling": {"n": 3, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6},
            "verifier": VERIFIER, "answer_extractor": "tests.test_evaluation.first_character", "val_batch_size": 4,
            "engine": {"class_path": "renio_pl.rollouts.HFGenerator", "init_args": {"batch_size": 2}},
        },
    }
    config_file = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "renio_pl.cli", "test", "--config", str(config_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    eval_folder = next(out.glob("**/eval"))
    assert "| seven | 7 |" in (eval_folder / "results.md").read_text()
    return {name: json.loads((eval_folder / f"{name}.json").read_text()) for name in benchmark_files}


@pytest.mark.slow
def test_test_command_gives_the_same_report_on_one_and_two_processes(model_dirs, benchmark_files, tmp_path):
    one = run_test(model_dirs, benchmark_files, tmp_path / "one", devices=1)
    two = run_test(model_dirs, benchmark_files, tmp_path / "two", devices=2)
    for name, count in (("seven", 7), ("three", 3)):
        report = one[name]
        assert [p["problem"] for p in report["problems"]] == list(range(count))  # none dropped or doubled
        assert all([s["sample"] for s in p["samples"]] == [0, 1, 2] for p in report["problems"])
        correct = [s["correct"] for p in report["problems"] for s in p["samples"]]
        assert report["metrics"]["avg@3"] == pytest.approx(sum(correct) / len(correct))
        assert 0 < sum(correct) < len(correct)  # mixed verdicts, so the comparison means something
        assert two[name] == report  # same samples, same verdicts, same metrics

"""The reasoning demo's task: traces worked digit by digit, a teacher that solves it, a student with a carry gap."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from renio_pl.demo.task import answer, group, reasoning_spec, trace
from renio_pl.evaluators.math import is_correct

REPO = Path(__file__).resolve().parents[1]


def test_a_trace_carries_digit_by_digit_and_ends_with_the_sum():
    assert trace(7, 85) == "7+5+0=12;0+8+1=09;092"
    assert trace(47, 85) == "7+5+0=12;4+8+1=13;132"
    assert trace(12, 34) == "2+4+0=06;1+3+0=04;046"
    assert {len(trace(a, b)) for a in range(100) for b in range(100)} == {21}  # one length: SFT batches stack
    assert group(7, 85) == "carry" and group(12, 34) == "no_carry" and group(5, 5) == "carry"
    assert answer(7, 85) == "290"  # the answer-only demo is unchanged
    # The verifier reads the trace's last number: a dropped carry in step 1 makes the answer wrong.
    assert is_correct(trace(47, 85), "132")
    assert not is_correct("7+5+0=02;4+8+0=12;122", "132")


def _validate(folder: Path, model: str, out: Path) -> dict[str, float]:
    """`renio-pl validate` of `model` on the held-out problems: accuracy overall and per group."""
    done = subprocess.run(
        [sys.executable, "-m", "renio_pl.cli", "validate", "--config", str(REPO / "configs" / "demo_reasoning.yaml"),
         "--model.student", str(folder / model), "--model.teacher", "null",
         "--data.val_path", str(folder / "heldout.jsonl"), "--data.train_path", str(folder / "train.jsonl"),
         "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                         "init_args": {"save_dir": str(out), "name": ""}}),
         "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(next(out.glob("version_*/metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_reasoning_assets_teacher_solves_and_student_fails_the_carries(tmp_path):
    """The reasoning demo's assets as `renio-pl-demo --task trace` builds them in the checkout (reused when their
    stamp matches; about 4 minutes on 2 busy cores otherwise), then greedy held-out accuracy of each model."""
    from renio_pl.demo.task import build_assets

    folder = build_assets(REPO / "demo_assets_trace", reasoning_spec())
    rows = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 500 and {r["group"] for r in rows} == {"carry", "no_carry"}
    teacher = _validate(folder, "teacher", tmp_path / "teacher")
    student = _validate(folder, "student", tmp_path / "student")
    print("teacher", teacher, "student", student)
    assert teacher["val/accuracy"] >= 0.95
    assert student["val/group_accuracy/no_carry"] >= 0.9 and student["val/group_accuracy/carry"] <= 0.1

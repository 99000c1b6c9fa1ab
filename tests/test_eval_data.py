"""The stored benchmark data: sha256 sums, record counts, the sha256 check on load, GSM8K answers, gold grading."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from renio_pl.errors import ConfigError
from renio_pl.evaluators.math import is_correct
from renio_pl.prompts import load_rows

DATA = Path(__file__).resolve().parents[1] / "evaluation" / "data"
MATH_COUNTS = {
    "../train/math_train_deepscaler.jsonl": 7474,
    "aime24_matharena.jsonl": 30,
    "aime25_matharena.jsonl": 30,
    "hmmt_feb25_matharena.jsonl": 30,
    "math500_deepscaler.jsonl": 500,
    "amc23_qwen25math.jsonl": 40,
}
GRADED = ["aime24_matharena.jsonl", "aime25_matharena.jsonl", "hmmt_feb25_matharena.jsonl"]


def _sums() -> dict[str, str]:
    entries = (line.split(maxsplit=1) for line in (DATA / "SHA256SUMS").read_text().splitlines())
    return {name.lstrip("*"): digest for digest, name in entries}


def test_every_listed_file_matches_its_sha256():
    sums = _sums()
    assert len(sums) == 9 and {"math/gsm8k_test.jsonl", "code/HumanEvalPlus-v0.1.10.jsonl.gz"} <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", MATH_COUNTS)
def test_record_counts(name):
    rows = load_rows(str(DATA / "math" / name), "problem", "answer", option="test")
    empty_answers = 4 if name.startswith("../train/") else 0  # four MATH train records have no answer
    assert len(rows) == MATH_COUNTS[name] and all(row.problem for row in rows)
    assert sum(not row.answer for row in rows) == empty_answers


def test_gsm8k_answers_are_the_text_after_the_marker():
    rows = load_rows(str(DATA / "math" / "gsm8k_test.jsonl"), "question", "answer", answer_after="####")
    assert len(rows) == 1319 and rows[0].answer == "18" and all("####" not in row.answer for row in rows)


def test_answer_after_takes_the_last_marker_and_requires_it(tmp_path):
    data = tmp_path / "gsm.jsonl"
    lines = [{"question": "1+1?", "answer": "#### 3?\n#### 2 "}, {"question": "2+2?", "answer": "2+2=4, so 4"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data_1 = tmp_path / "one.jsonl"
    data_1.write_text(json.dumps(lines[0]) + "\n")
    assert load_rows(str(data_1), "question", "answer", answer_after="####")[0].answer == "2"
    with pytest.raises(ConfigError, match="data.eval_path: line 2 of .*gsm.jsonl has no answer after '####'"):
        load_rows(str(data), "question", "answer", option="data.eval_path", answer_after="####")
    with pytest.raises(ConfigError, match="needs a non-empty marker and an answer column"):
        load_rows(str(data), "question", None, answer_after="####")


def test_tampered_file_fails_its_sha256_check(tmp_path):
    source = DATA / "math" / "aime24_matharena.jsonl"
    (tmp_path / "math").mkdir()
    copy = tmp_path / "math" / source.name
    shutil.copyfile(source, copy)
    (tmp_path / "SHA256SUMS").write_text(f"{_sums()['math/aime24_matharena.jsonl']}  math/{source.name}\n")
    assert len(load_rows(str(copy), "problem", "answer")) == 30
    data = bytearray(copy.read_bytes())
    data[100] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="data.train_path: .* does not match its sha256 in .*SHA256SUMS"):
        load_rows(str(copy), "problem", "answer")


def test_unlisted_file_next_to_sha256sums_loads(tmp_path):
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  other.jsonl\n")
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert load_rows(str(data), "problem", "answer")[0].answer == "2"


@pytest.mark.parametrize("name", GRADED)
def test_every_gold_answer_grades_as_correct(name):
    for row in load_rows(str(DATA / "math" / name), "problem", "answer"):
        assert is_correct(f"... so the answer is \\boxed{{{row.answer}}}", row.answer), (name, row.index, row.answer)


@pytest.mark.parametrize(
    ("gold", "wrong"),
    [("204", "205"), ("025", "52"), ("\\frac{1}{576}", "\\frac{1}{575}"), ("\\sqrt{6}", "\\sqrt{5}"),
     ("2^{25} \\cdot 26!", "2^{24} \\cdot 26!"), ("1-\\frac{2}{\\pi}", "1+\\frac{2}{\\pi}")],
)
def test_wrong_answers_grade_as_wrong(gold, wrong):
    assert not is_correct(f"... so the answer is \\boxed{{{wrong}}}", gold)

"""Loading prompt rows (jsonl, parquet, errors) and rendering them with a chat template."""

import json

import datasets
import pytest

from renio_pl.errors import ConfigError
from renio_pl.prompts import PromptFormat, load_rows, render_prompt
from tests.conftest import tiny_tokenizer


def test_jsonl_and_parquet_give_the_same_rows(prompt_file, tmp_path):
    rows = load_rows(str(prompt_file), "prompt", "answer")
    assert len(rows) == 12 and rows[3].problem == "What is 3+4?" and rows[3].answer == "7" and rows[3].index == 3
    parquet = tmp_path / "problems.parquet"
    datasets.load_dataset("json", data_files=str(prompt_file), split="train").to_parquet(str(parquet))
    assert load_rows(str(parquet), "prompt", "answer") == rows
    assert load_rows(str(prompt_file), "prompt", None)[0].answer is None


def test_bad_data_gives_one_clear_error(prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="data.train_path: file missing.jsonl does not exist"):
        load_rows("missing.jsonl", "prompt", "answer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"is empty \(0 bytes\)"):
        load_rows(str(empty), "prompt", "answer")
    with pytest.raises(ConfigError, match="has no column 'question' \\(data.prompt_field\\); its columns are prompt, answer"):
        load_rows(str(prompt_file), "question", "answer")
    with pytest.raises(ConfigError, match="has no column 'solution' \\(data.answer_field\\)"):
        load_rows(str(prompt_file), "prompt", "solution")
    with pytest.raises(ConfigError, match="cannot load hub data set 'nobody/no-such-set'"):
        load_rows("nobody/no-such-set", "prompt", "answer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"^data.train_path: line 2 of .*bad.jsonl is not valid JSON \(Expecting property name"):
        load_rows(str(bad), "prompt", None)


def test_render_uses_chat_template_and_generation_prompt():
    tokenizer = tiny_tokenizer()
    ids = render_prompt(tokenizer, "1+1", PromptFormat(template="Q: {problem}", system="be brief"))
    assert tokenizer.decode(ids) == "s:be brief\nu:Q: 1+1\na:"
    with pytest.raises(ConfigError, match="must contain \\{problem\\}"):
        PromptFormat(template="no placeholder")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompt(tokenizer, "1+1", PromptFormat())

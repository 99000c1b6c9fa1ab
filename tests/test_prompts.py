"""Loading prompt rows (jsonl, parquet, errors) and rendering them with a chat template."""

import json

import datasets
import pytest

from renio_pl.errors import ConfigError
from renio_pl.prompt_format import PromptFormat, render_prompt
from renio_pl.prompts import load_rows
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


# --- records as users have them: conversational, plain text, data set folders, hub subsets ------
def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_conversational_records_are_rendered_with_the_chat_template(tmp_path, model_dirs):
    """TRL's conversational format: a list of messages, not their str() (which they once became)."""
    from renio_pl.datamodule import OnPolicyDataModule

    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}], "answer": "4"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "3+3"}], "answer": "6"},
        {"prompt": "4+4", "answer": "8"},  # plain text records mix in
    ])
    rows = load_rows(path, "prompt", "answer")
    assert [r.problem for r in rows] == ["1+1", "2+2", "3+3", "4+4"] and rows[3].messages is None
    assert rows[1].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}]
    tokenizer = tiny_tokenizer()
    texts = [tokenizer.decode(render_prompt(tokenizer, r.problem, PromptFormat(), messages=r.messages)) for r in rows]
    assert texts == ["u:1+1\na:", "s:be brief\nu:2+2\na:", "u:hi\na:hello\nu:3+3\na:", "u:4+4\na:"]
    # the template wraps the last user turn; a system message is added only where the record has none
    shaped = PromptFormat(template="Q: {problem}", system="sys")
    texts = [tokenizer.decode(render_prompt(tokenizer, r.problem, shaped, messages=r.messages)) for r in rows[:3]]
    assert texts == ["s:sys\nu:Q: 1+1\na:", "s:be brief\nu:Q: 2+2\na:", "s:sys\nu:hi\na:hello\nu:Q: 3+3\na:"]

    data = OnPolicyDataModule(path, tokenizer=str(model_dirs["student"]))
    data.setup("fit")
    assert [tokenizer.decode(ids) for ids in data.train_prompt_ids][:2] == ["u:1+1\na:", "s:be brief\nu:2+2\na:"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 7, "answer": "1"}', r"line 3 of .*bad.jsonl has 7 in column 'prompt'; a prompt is text or a list of messages"),
    ('{"prompt": null}', r"line 3 of .*bad.jsonl has null in column 'prompt'"),
    ('{"prompt": [{"role": "assistant", "content": "x"}]}', r"line 3 .* has \[\{\"role\": \"assistant\""),
    ('{"prompt": [{"role": "user", "content": [{"type": "text"}]}]}', r"line 3 of .*bad.jsonl has \[\{\"role\": \"user\""),
    ('["a list"]', r"line 3 of .*bad.jsonl is a JSON list, not a record of columns"),
    ('{"prompt": "x", ', r"line 3 of .*bad.jsonl is not valid JSON \(Expecting property name enclosed in double quotes"),
])
def test_anything_else_is_a_one_line_error_with_its_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n' + line + "\n")  # line 2 is blank: line numbers count it
    with pytest.raises(ConfigError, match="^data.train_path: " + message) as error:
        load_rows(str(bad), "prompt", None)
    assert "\n" not in str(error.value)


def test_answer_errors_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"q": "a", "a": "#### 1"}, {"q": "b", "a": "no marker"}])
    with pytest.raises(ConfigError, match=r"line 2 of .*g.jsonl has no answer after '####'"):
        load_rows(path, "q", "a", answer_after="####")


def write_hub_layout(folder) -> None:
    """A hub data set's files as `openai/gsm8k` lays them out: one folder per subset, named in the README."""
    for subset, count in (("main", 3), ("socratic", 2)):
        (folder / subset).mkdir(parents=True)
        records = [{"question": f"{subset} {i}", "answer": f"work\n#### {i}"} for i in range(count)]
        datasets.Dataset.from_list(records).to_parquet(str(folder / subset / "train-00000-of-00001.parquet"))
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*\n" for s in ("main", "socratic"))
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")


def test_a_data_set_with_subsets_loads_by_subset_and_split(tmp_path):
    write_hub_layout(tmp_path / "gsm8k")
    rows = load_rows(str(tmp_path / "gsm8k"), "question", "answer", "train", answer_after="####", subset="socratic")
    assert [(r.problem, r.answer) for r in rows] == [("socratic 0", "0"), ("socratic 1", "1")]
    assert len(load_rows(str(tmp_path / "gsm8k"), "question", "answer", subset="main")) == 3
    with pytest.raises(ConfigError, match=r"subset None.*Config name is missing. Please pick one among the available "
                                          r"configs: \['main', 'socratic'\]"):
        load_rows(str(tmp_path / "gsm8k"), "question", "answer")
    with pytest.raises(ConfigError, match=r"Unknown split \"test\""):
        load_rows(str(tmp_path / "gsm8k"), "question", "answer", "test", subset="main")
    with pytest.raises(ConfigError, match=r"cannot load hub data set 'openai/gsm8k' \(subset 'main', split 'train'\)"):
        load_rows("openai/gsm8k", "question", "answer", subset="main")  # offline here: no hub


def test_a_saved_data_set_folder_loads_its_split(tmp_path):
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"}]),
        "test": datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "5+5"}], "answer": "10"}]),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    (row,) = load_rows(str(tmp_path / "saved"), "prompt", "answer", "test")
    assert (row.problem, row.answer, row.messages) == ("5+5", "10", [{"role": "user", "content": "5+5"}])
    with pytest.raises(ConfigError, match=r"has no split 'validation' \(data.split\); its splits are train, test"):
        load_rows(str(tmp_path / "saved"), "prompt", "answer", "validation")
    splits["train"].save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one"), "prompt", "answer")[0].problem == "1+1"

"""Prompts: data rows (jsonl, parquet, a data set folder or a hub data set) -> `PromptRow`s.

Stage 1 of the data flow (**prompts** -> rollouts -> log-probs -> weights -> loss), first half:
reading. `renio_pl.prompt_format` renders the rows into chat-formatted prompt token ids.

A record's prompt is text (`{"prompt": "What is 2+3?"}`) or, as TRL's conversational data
sets have it, a list of messages (`{"prompt": [{"role": "user", "content": "What is 2+3?"}]}`).
Anything else is refused with the record's place (a JSON Lines file's line number).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from renio_pl.errors import ConfigError

__all__ = ["PromptRow", "load_rows", "load_table", "read_prompt", "where", "require_columns", "check_sha256"]

log = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".parquet": "parquet"}


@dataclass
class PromptRow:
    """One training or evaluation problem.

    Attributes:
        index: position in its data set.
        problem: the problem text, before the template.
        answer: the reference final answer, or None when the data has none.
        solution: the reference solution (OPSD's privileged context), or None.
        group: the problem's group (e.g. `carry`), for accuracy per group; None when the data has none.
        messages: a conversational record's messages (`role`, `content`), or None for a text
            prompt; `problem` is then the content of its last user message.
    """

    index: int
    problem: str
    answer: str | None = None
    solution: str | None = None
    group: str | None = None
    messages: list[dict[str, str]] | None = None


def _looks_like_path(source: str) -> bool:
    return source.endswith(tuple(_FILE_FORMATS)) or source.startswith((".", "/", "~"))


def load_rows(
    source: str,
    prompt_field: str,
    answer_field: str | None,
    split: str = "train",
    option: str = "data.train_path",
    answer_after: str | None = None,
    solution_field: str | None = None,
    group_field: str | None = None,
    subset: str | None = None,
) -> list[PromptRow]:
    """Read problems from a jsonl / parquet file, a data set folder or a hub data set id.

    A local file listed in the nearest `SHA256SUMS` above it (its own folder or a parent;
    `sha256sum` format, paths relative to that folder) must match its sha256 there; files
    not listed, or with no `SHA256SUMS` above them, load unchecked.

    Args:
        source: a local `.jsonl`, `.json` (either may be gzipped) or `.parquet` file, a data set
            folder (`save_to_disk`, or a hub data set's files), or a hub data set id.
        prompt_field: column holding the problem: text, or a list of role/content messages.
        answer_field: column holding the reference answer, or None for none.
        split: the split of a hub data set (or of a data set folder with splits).
        option: the config key `source` came from, named in errors.
        answer_after: a marker the answer follows (GSM8K: `"####"`); each answer becomes the
            stripped text after its last occurrence. None keeps answers whole.
        solution_field: column holding the reference solution (OPSD), or None for none.
        group_field: column holding each problem's group (diagnostics only), or None for none.
        subset: the subset (configuration) of a hub data set, e.g. `main` for `openai/gsm8k`.
    Returns:
        One `PromptRow` per record, in file order.
    Raises:
        ConfigError: unreadable or missing data, a missing column, a sha256 mismatch, a prompt
            that is neither text nor messages, a record whose answer has nothing after
            `answer_after`, or an empty solution; each names the record (its line in a jsonl).
    """
    if answer_after is not None and (not answer_after or answer_field is None):
        raise ConfigError(
            f"{option}: answer_after {answer_after!r} needs a non-empty marker and an answer column (data.answer_field)"
        )
    data = load_table(source, split, option, subset)
    require_columns(data, source, option, {"prompt_field": prompt_field, "answer_field": answer_field,
                                           "solution_field": solution_field, "group_field": group_field})
    prompts = [read_prompt(value, where(data, i, source), option, prompt_field) for i, value in enumerate(data[prompt_field])]
    answers = data[answer_field] if answer_field is not None else [None] * len(data)
    answers = [None if a is None else str(a) for a in answers]
    if answer_after is not None:
        for i, answer in enumerate(answers):
            _, marker, tail = (answer or "").rpartition(answer_after)
            if not marker or not tail.strip():
                raise ConfigError(
                    f"{option}: {where(data, i, source)} has no answer after {answer_after!r} (answer_after) "
                    f"in column {answer_field!r}; fix the record or the marker"
                )
            answers[i] = tail.strip()
    solutions = [None] * len(data)
    if solution_field is not None:
        solutions = [None if text is None else str(text) for text in data[solution_field]]
        empty = next((i for i, text in enumerate(solutions) if not (text or "").strip()), None)
        if empty is not None:
            raise ConfigError(
                f"{option}: {where(data, empty, source)} has no reference solution in column {solution_field!r} "
                "(data.solution_field); OPSD's teacher needs one for every problem"
            )
    groups = [None if g is None else str(g) for g in data[group_field]] if group_field else [None] * len(data)
    return [
        PromptRow(i, problem, a, sol, group=g, messages=messages)
        for i, ((problem, messages), a, sol, g) in enumerate(zip(prompts, answers, solutions, groups))
    ]


def read_prompt(value: Any, place: str, option: str, column: str) -> tuple[str, list[dict[str, str]] | None]:
    """A record's prompt as (problem text, messages or None): text, or a list of role/content messages.

    Raises:
        ConfigError: anything else (a number, null, messages without a user turn or with non-text content).
    """
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        users = [m["content"] for m in value if m["role"] == "user"]
        if users:
            return users[-1], [{"role": m["role"], "content": m["content"]} for m in value]
    shown = json.dumps(value, default=str)
    raise ConfigError(
        f"{option}: {place} has {shown[:80] + ('...' if len(shown) > 80 else '')} in column {column!r}; a prompt is "
        'text or a list of messages with a user turn ([{"role": "user", "content": "..."}])'
    )


def where(table: datasets.Dataset | _JsonLines, i: int, source: str) -> str:
    """Record `i` of `table` as a user finds it: `line <n> of <file>` for JSON Lines, else `record <i> of <source>`."""
    return f"line {table.lines[i]} of {source}" if isinstance(table, _JsonLines) else f"record {i} of {source}"


def load_table(
    source: str, split: str = "train", option: str = "data.train_path", subset: str | None = None
) -> datasets.Dataset | _JsonLines:
    """The records of a local file, a data set folder or a hub data set, as columns (`column_names`, `len`, `table[column]`).

    Args:
        source: a local `.jsonl`, `.json` (either may be gzipped) or `.parquet` file, or a hub data set id.
            A local file listed in the nearest `SHA256SUMS` above it must match its sha256 there.
            A folder is a data set saved with `save_to_disk`, or a hub data set's files (its
            `README.md` naming its subsets, or data files by split).
        split: the split of a hub data set or folder.
        option: the config key `source` came from, named in errors.
        subset: the subset (configuration name) of a hub data set or folder, or None.
    Raises:
        ConfigError: a missing, empty, unreadable or mismatching file, a broken JSON line, an
            unknown or offline hub id, an unknown subset or split, or no records.
    """
    path = Path(source).expanduser()
    if path.is_file():
        suffix = Path(path.stem).suffix + ".gz" if path.suffix == ".gz" else path.suffix
        fmt = _FILE_FORMATS.get(suffix)
        if fmt is None:
            raise ConfigError(f"{option}: unsupported file type {suffix!r} ({source}); use .jsonl(.gz) or .parquet")
        check_sha256(path, source, option)
        if path.stat().st_size == 0:
            raise ConfigError(f"{option}: {source} is empty (0 bytes); give a file with at least one record")
        try:
            data = _JsonLines(path, source, option) if fmt == "jsonl" else datasets.load_dataset(
                fmt, data_files=str(path), split="train"
            )
        except ConfigError:
            raise
        except Exception as error:  # datasets and json raise many types for unreadable files
            raise ConfigError(f"{option}: cannot read {source} as {suffix}: {_first_line(error)}") from error
    elif path.is_dir():
        data = _load_folder(path, source, split, subset, option)
    elif _looks_like_path(source):
        raise ConfigError(f"{option}: file {source} does not exist; check the path")
    else:
        try:
            data = datasets.load_dataset(source, subset, split=split)
        except Exception as error:  # offline hub, unknown id, missing subset or split
            raise ConfigError(
                f"{option}: cannot load hub data set {source!r} (subset {subset!r}, split {split!r}): "
                f"{_first_line(error)}; download it first (its subset in data.subset, its split in data.split) "
                "or point to a local .jsonl / .parquet file"
            ) from error
    if len(data) == 0:
        raise ConfigError(f"{option}: {source} has no records; give a file with at least one record")
    return data


def _load_folder(path: Path, source: str, split: str, subset: str | None, option: str) -> datasets.Dataset:
    """A data set folder: one written by `save_to_disk` (a split of it, if it has splits), or a hub data set's files."""
    try:
        if (path / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(path))
            if split not in splits:
                raise ConfigError(f"{option}: {source} has no split {split!r} (data.split); its splits are {', '.join(splits)}")
            return splits[split]
        if (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), subset, split=split)
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types: unknown subset or split, no data files
        raise ConfigError(
            f"{option}: cannot load the data set folder {source} (subset {subset!r}, split {split!r}): "
            f"{_first_line(error)}"
        ) from error


def require_columns(table: datasets.Dataset | _JsonLines, source: str, option: str, fields: dict[str, str | None]) -> None:
    """Raise unless `table` has each named column (`fields`: data option -> column name, None for none)."""
    for key, name in fields.items():
        if name is not None and name not in table.column_names:
            raise ConfigError(
                f"{option}: {source} has no column {name!r} (data.{key}); its columns are {', '.join(table.column_names)}"
            )


class _JsonLines:
    """The records of a (gzipped) JSON Lines file, read as columns like a `datasets.Dataset`.

    Read with `json`, not `datasets`: Arrow's JSON reader fails on records with very large
    values (HumanEval+'s test inputs) and on columns whose types vary between records.
    """

    def __init__(self, path: Path, source: str, option: str) -> None:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()
        self.records: list[dict] = []
        self.lines: list[int] = []  # each record's line number (from 1)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{option}: line {number} of {source} is not valid JSON ({error.msg}, column {error.colno}); "
                    "fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{option}: line {number} of {source} is a JSON {type(record).__name__}, not a record of columns "
                    '(e.g. {"prompt": "...", "answer": "..."})'
                )
            self.records.append(record)
            self.lines.append(number)
        self.column_names = list(dict.fromkeys(key for record in self.records for key in record))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, column: str) -> list:
        return [record.get(column) for record in self.records]


def check_sha256(path: Path, source: str, option: str) -> None:
    """Raise if `path` is listed in the nearest `SHA256SUMS` above it with another sha256."""
    path = path.resolve()
    folder = next((parent for parent in path.parents if (parent / "SHA256SUMS").is_file()), None)
    if folder is None:
        return
    sums_path, name = folder / "SHA256SUMS", path.relative_to(folder).as_posix()
    entries = (line.partition(" ") for line in sums_path.read_text().splitlines())
    # "<hex>  <name>" (text mode) or "<hex> *<name>" (binary mode)
    expected = next((digest for digest, _, rest in entries if rest[1:] == name), None)
    if expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ConfigError(
            f"{option}: {source} does not match its sha256 in {sums_path} (expected {expected}, got "
            f"{digest.hexdigest()}); restore the file or update SHA256SUMS"
        )


def _first_line(error: Exception) -> str:
    """The error's first line; with the choices `datasets` lists on the next one (subsets to pick from)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[1].startswith("Please pick") else lines[0]

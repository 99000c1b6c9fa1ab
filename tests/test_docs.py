"""Every command in README.md and docs/*.md runs as written; the pages say nothing about how they were made.

The commands are the lines of the ```bash blocks (a trailing `\\` continues a line, `#` starts a
comment). How each is run, in the repository root:

- `renio-pl` / `renio-pl-redi` with a subcommand (`fit`, `validate`, `test`, `predict`):
  with `--print_config` appended, unless it has `--help` or `--print_config` already. That
  parses the whole command as written (config files, options, class paths) without training.
- any other `renio-pl*` command with `--help`, `--list` or `--print_config`: as written.
- anything else (installs, training runs, benchmarks, servers) must sit in a block whose fence
  follows the line `<!-- not run by tests: <why> -->`; the test fails on an unmarked one.

Commands run in this process, through the entry points `pyproject.toml` declares.
"""

from __future__ import annotations

import re
import shlex
from importlib import import_module

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run by tests: [^>]+ -->")
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
SUBCOMMANDS = {"fit", "validate", "test", "predict"}
PARSE_ONLY = {"--help", "--list", "--print_config"}


def entry_points() -> dict[str, str]:
    """`[project.scripts]` of pyproject.toml: command -> `module:function` (Python 3.10 has no tomllib)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', section, re.M))


def commands_of(block: str) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments and env assignments dropped)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def documented_commands() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(commands to run, commands that are neither runnable nor marked), each with `page:line`."""
    runnable, unmarked = [], []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip().splitlines()
            if before and NOT_RUN.fullmatch(before[-1].strip()):
                continue
            where = f"{page.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}"
            for words in commands_of(match.group(1)):
                program = words[0]
                if program in ("renio-pl", "renio-pl-redi") and len(words) > 1 and words[1] in SUBCOMMANDS:
                    runnable.append((where, words if PARSE_ONLY & set(words) else [*words, "--print_config"]))
                elif program.startswith("renio-pl") and PARSE_ONLY & set(words):
                    runnable.append((where, words))
                else:
                    unmarked.append((where, words))
    return runnable, unmarked


RUNNABLE, UNMARKED = documented_commands()


def test_every_long_command_is_marked_as_not_run():
    assert not UNMARKED, "mark these blocks `<!-- not run by tests: why -->` or make them parse-only:\n" + "\n".join(
        f"{where}: {shlex.join(words)}" for where, words in UNMARKED
    )


def test_the_pages_have_commands_to_run():
    assert len(RUNNABLE) >= 15
    programs = {words[0] for _, words in RUNNABLE}
    assert {"renio-pl", "renio-pl-redi", "renio-pl-report", "renio-pl-configs"} <= programs


@pytest.mark.parametrize("where,words", RUNNABLE, ids=[f"{w}:{' '.join(c[:3])}" for w, c in RUNNABLE])
def test_documented_command_runs(where, words, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    module, _, function = entry_points()[words[0]].partition(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(import_module(module), function)(words[1:])
        raise SystemExit(0)  # a command that returns normally succeeded
    output = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{where}: {shlex.join(words)}\n{output.err[-2000:]}"
    assert output.out.strip(), f"{where}: {shlex.join(words)} printed nothing"


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("install", "cli", "own-model", "monitoring", "opsd", "redi", "trd", "evaluation",
                 "several-processes", "diagnostics", "paper-configs", "benchmarks"):
        assert f"(docs/{page}.md)" in readme, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_say_nothing_about_how_they_were_made(page):
    """No issue numbers, commit hashes or notes about the machines a page was written on."""
    text = page.read_text()
    for pattern in (r"\bissues? #?\d", r"#\d{1,4}\b", r"\bthis machine\b", r"\blent\b", r"\bat [0-9a-f]{7,40}\b",
                    r"\bcommit [0-9a-f]{7,40}\b", r"\bthis repo's\b", r"\bno GPU here\b"):
        found = re.search(pattern, text, re.I)
        assert found is None, f"{page.name}: {found.group(0)!r} in ...{text[max(0, found.start() - 60):found.end() + 60]}..."
    for word in re.findall(r"\b[0-9a-f]{7,40}\b", text):
        assert not (re.search(r"[a-f]", word) and re.search(r"\d", word)), f"{page.name}: commit-like {word!r}"

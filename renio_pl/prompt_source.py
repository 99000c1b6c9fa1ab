"""PromptSource: where a set of problems comes from and how each becomes a prompt.

One description for every loader: the on-policy training and held-out prompts, each
benchmark of `data.test_sets`, the offline traces and the problems `renio-pl-redi-traces`
samples. The data modules build it from their own options (`data.train_path`,
`data.prompt_field`, ...; a benchmark's from its `test_sets` entry), so the config keys stay
what they are; it is not an option itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from renio_pl.paths import InputPath
from renio_pl.prompt_format import PromptFormat, render_prompt
from renio_pl.prompts import PromptRow, load_rows

__all__ = ["PromptSource"]


@dataclass(frozen=True)
class PromptSource:
    """A set of problems: the data, its columns and the prompt format they are rendered with.

    Attributes:
        path: a jsonl / parquet file, a data set folder or a hub data set id.
        option: the config key `path` came from, named in every error about the data
            (`data.train_path`, `data.test_sets[0].path`).
        prompt_field: column holding the problem: text, or a list of role/content messages.
        answer_field: column holding the reference answer; None when the data has none.
        answer_after: keep only the text after the last occurrence of this marker in each
            answer (GSM8K: `####`); empty keeps the whole answer.
        split: split of a hub data set.
        subset: subset (configuration name) of a hub data set, e.g. `main` for `openai/gsm8k`.
        prompt_format: the student's template, system message and chat-template variables.
        solution_field: column holding a reference solution (OPSD: the teacher reads it in its
            privileged prompt); None for none.
        teacher_prompt_format: the teacher's privileged prompt (with `{solution}`), rendered
            when `solution_field` is set.
        group_field: column holding each problem's group (diagnostics only); None for none.
    """

    path: InputPath
    option: str
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    answer_after: str = ""
    split: str = "train"
    subset: str | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    solution_field: str | None = None
    teacher_prompt_format: PromptFormat | None = None
    group_field: str | None = None

    def load_rows(self) -> list[PromptRow]:
        """Every record as a `PromptRow`, in file order (`renio_pl.prompts.load_rows`)."""
        return load_rows(
            self.path, self.prompt_field, self.answer_field, self.split, self.option,
            answer_after=self.answer_after or None, solution_field=self.solution_field, group_field=self.group_field,
            subset=self.subset,
        )

    def render(self, tokenizer: PreTrainedTokenizerBase, row: PromptRow) -> tuple[list[int], list[int] | None]:
        """`row`'s prompt ids, and the teacher's privileged prompt ids (None without `solution_field`)."""
        ids = render_prompt(tokenizer, row.problem, self.prompt_format, messages=row.messages)
        if self.solution_field is None:
            return ids, None
        return ids, render_prompt(tokenizer, row.problem, self.teacher_prompt_format, row.solution, messages=row.messages)

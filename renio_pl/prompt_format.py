"""Prompt formats: a problem (and a reference solution) -> chat-formatted prompt token ids.

Stage 1 of the data flow (**prompts** -> rollouts -> log-probs -> weights -> loss), second half:
rendering. `renio_pl.prompts` reads the rows. A text prompt, or the last user message of a
conversational record, goes through `PromptFormat.template`; the messages are then rendered
with the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from renio_pl.errors import ConfigError

__all__ = ["PromptFormat", "render_prompt", "OPSD_STUDENT_TEMPLATE", "OPSD_TEACHER_TEMPLATE"]


# OPSD's prompts as its authors released them (Zhao et al.): the student sees the problem, the
# teacher (the student's own base weights) also the reference solution, with thinking on.
OPSD_STUDENT_TEMPLATE = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
OPSD_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    "After reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the "
    "same final answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)


@dataclass
class PromptFormat:
    """How a problem becomes the prompt text the model sees.

    Attributes:
        template: user message, with `{problem}` where the problem goes (and, in a teacher's
            privileged prompt, `{solution}` where the reference solution goes); other braces
            are doubled (`\\boxed{{}}`).
        system: an optional system message.
        chat_template_kwargs: extra variables for the tokenizer's chat template
            (for Qwen3: `{enable_thinking: false}`).
    """

    template: str = "{problem}"
    system: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "{problem}" not in self.template:
            raise ConfigError(f"data.prompt_format.template must contain {{problem}}; got {self.template!r}")


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    prompt_format: PromptFormat,
    solution: str | None = None,
    messages: list[dict[str, str]] | None = None,
) -> list[int]:
    """Token ids of `problem` (and `solution`, when given) rendered with `prompt_format` and the chat template.

    For a conversational record (`messages`, whose last user message holds `problem`) its
    messages are rendered as given, the last user message through `prompt_format.template`,
    with `prompt_format.system` first unless the record has a system message. The chat template
    adds the generation prompt (the assistant turn's opening), so the first generated token is
    the first completion token.
    """
    if tokenizer.chat_template is None:
        raise ConfigError(
            "the student's tokenizer has no chat template; use an instruct model or add a "
            "chat_template to its tokenizer_config.json"
        )
    fields = {"problem": problem} if solution is None else {"problem": problem, "solution": solution}
    user = {"role": "user", "content": prompt_format.template.format(**fields)}
    if messages is None:
        messages = [user]
    else:
        last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
        messages = [*messages[:last_user], user, *messages[last_user + 1 :]]
    if prompt_format.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": prompt_format.system}, *messages]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **prompt_format.chat_template_kwargs
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]

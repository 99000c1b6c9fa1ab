"""Progress of sampling: a bar that counts finished completions and generated tokens, with a rate and an ETA.

`GenerationProgress` rides along `transformers` `generate` as a logits processor (it leaves the
scores untouched) and, at every decoding step, counts the completions that have emitted an EOS
and the tokens generated so far, so the bar moves during a long `generate` call instead of
after it. Completions still running when a call ends reached `max_new_tokens`; `finish_call`
counts them.
"""

from __future__ import annotations

import time

import torch
from torch import FloatTensor, LongTensor
from tqdm.auto import tqdm
from transformers import LogitsProcessor

__all__ = ["GenerationProgress"]


class GenerationProgress(LogitsProcessor):
    """A tqdm bar over `total` completions; the postfix shows generated tokens per second.

    Args:
        total: completions to sample (prompts x samples per prompt).
        eos_ids: the ids that end a completion.
        disable: no bar (the counts are still kept).
    """

    def __init__(self, total: int, eos_ids: list[int], disable: bool = False) -> None:
        self.bar = tqdm(total=total, desc="sampling", unit="completion", leave=False, disable=disable, smoothing=0.1)
        self.eos_ids = eos_ids
        self.done_before = 0  # completions of earlier generate calls
        self.tokens_before = 0
        self.done = self.tokens = 0
        self.prompt_width = 0
        self.start = time.perf_counter()

    def start_call(self, prompt_width: int) -> None:
        """A `generate` call begins whose inputs are `prompt_width` tokens wide."""
        self.prompt_width = prompt_width

    def __call__(self, input_ids: LongTensor, scores: FloatTensor) -> FloatTensor:
        """Counts the completions (rows of `input_ids`, (R, width + t)) finished so far; returns `scores` as is."""
        generated = input_ids[:, self.prompt_width :]  # (R, t)
        if generated.shape[1]:
            is_eos = torch.isin(generated, torch.tensor(self.eos_ids, device=generated.device))  # (R, t)
            finished = is_eos.any(dim=1)  # (R,)
            first_eos = is_eos.float().argmax(dim=1)  # (R,) position of the first EOS
            lengths = torch.where(finished, first_eos + 1, generated.shape[1])  # (R,)
            self._show(int(finished.sum()), int(lengths.sum()))
        return scores

    def finish_call(self, completions: list[list[int]]) -> None:
        """A `generate` call ended with these completions (EOS-cut token lists)."""
        self.done_before += len(completions)
        self.tokens_before += sum(len(c) for c in completions)
        self._show(0, 0)

    def _show(self, done_in_call: int, tokens_in_call: int) -> None:
        self.done, self.tokens = self.done_before + done_in_call, self.tokens_before + tokens_in_call
        self.bar.update(self.done - self.bar.n)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / seconds:.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> GenerationProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The demo tasks: two-digit addition, answered directly or as a short reasoning trace.

`answer` (the default demo): `07+85=` is answered `290` (92 zero-padded to `092`, reversed),
then EOS. `trace` (the reasoning demo): the sum is written out digit by digit with its carries,
units first, then the answer: `07+85=` is answered `7+5+0=12;0+8+1=09;092`. Each step reads
`a+b+c=` (the digits and the carry in) and its two-digit sum, whose first digit is the next
step's carry, so a wrong early step (a carry dropped) makes the answer wrong: the pivotal
tokens sit inside the trajectory. A verifier checks answers exactly; a character tokenizer
keeps models tiny. `build_assets` writes everything a demo config reads: a train / held-out
split of all 10,000 problems as jsonl (each row with its `group`, `carry` or `no_carry`:
whether the units digits carry), a tokenizer with a chat template, and two random-init Qwen3
models trained by supervised fine-tuning for different data: a teacher trained on every
training problem, and a student that never saw a units carry (it solves carry-free problems
and fails the others), so the teacher has something specific to teach.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

__all__ = ["DemoSpec", "reasoning_spec", "build_assets", "make_tokenizer", "problem", "answer", "trace", "completion", "group"]

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = list("0123456789+=")  # the `trace` task adds `;`
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def problem(a: int, b: int) -> str:
    """`a+b=` with both operands zero-padded to two digits."""
    return f"{a:02d}+{b:02d}="


def answer(a: int, b: int) -> str:
    """The sum zero-padded to three digits, written least-significant digit first."""
    return f"{a + b:03d}"[::-1]


def trace(a: int, b: int) -> str:
    """The sum worked digit by digit, units first (`a+b+carry=two-digit sum;`), then the 3-digit sum."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return f"{a % 10}+{b % 10}+0={units:02d};{a // 10}+{b // 10}+{units // 10}={tens:02d};{a + b:03d}"


def group(a: int, b: int) -> str:
    """`carry` when the units digits carry, else `no_carry` (the student never saw a carry)."""
    return "carry" if a % 10 + b % 10 >= 10 else "no_carry"


def completion(task: str, a: int, b: int) -> str:
    """The completion the verifier accepts for `task` (`answer` or `trace`)."""
    return trace(a, b) if task == "trace" else answer(a, b)


def make_tokenizer(characters: str = "".join(CHARACTERS), chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A character tokenizer (one token per character, ids after `<pad>`, `<eos>`, `<unk>`)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(characters)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@dataclass
class ModelSpec:
    """A tiny Qwen3 (head_dim 32, which vLLM's CPU backend needs) and its SFT budget."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    sft_steps: int
    seed: int
    sft_lr: float | None = None  # None: DemoSpec.sft_lr


@dataclass
class DemoSpec:
    """Everything that shapes the demo assets; a change rebuilds them."""

    held_out: int = 500
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    # the teacher at 3e-3 stuck at a loss plateau (1-2% held-out, seeds 1 and 2) on some CPUs' float arithmetic;
    # at 1e-3 it reached 100% on every seed tried
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(128, 3, 4, 256, sft_steps=500, seed=1, sft_lr=1e-3))
    student: ModelSpec = field(default_factory=lambda: ModelSpec(128, 3, 4, 256, sft_steps=400, seed=2))
    student_sees_carries: bool = False
    split_seed: int = 0
    task: str = "answer"  # `answer` or `trace` (see the module docstring)
    teacher_attempts: int = 3  # SFT seeds tried in turn (teacher.seed, +1, ...) until the teacher passes
    teacher_min_accuracy: float = 0.9  # greedy held-out accuracy the teacher must reach (tests of plumbing: 0)
    version: int = 4


def reasoning_spec() -> DemoSpec:
    """The reasoning demo's assets: the `trace` task, with SFT batches of 64 so both models build in minutes on
    2 CPU cores (a trace is 22 tokens against the answer's 4)."""
    return DemoSpec(
        task="trace", sft_batch_size=64,
        teacher=ModelSpec(128, 3, 4, 256, sft_steps=500, seed=1), student=ModelSpec(128, 3, 4, 256, sft_steps=300, seed=2),
    )


def _split(spec: DemoSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(spec.split_seed).shuffle(pairs)
    return pairs[spec.held_out :], pairs[: spec.held_out]


def _write_jsonl(path: Path, pairs: list[tuple[int, int]], task: str) -> None:
    with path.open("w") as f:
        for a, b in pairs:
            # the verifier takes a trace's last number, so its answer is the sum as written at its end
            reference = f"{a + b:03d}" if task == "trace" else answer(a, b)
            f.write(json.dumps({"prompt": problem(a, b), "answer": reference, "group": group(a, b)}) + "\n")


def _train_sft(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[int, int]], demo: DemoSpec
) -> Qwen3ForCausalLM:
    """Random-init Qwen3 trained to produce `completion<eos>` after `problem` (loss on the completion)."""
    torch.manual_seed(spec.seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=max(1, spec.num_attention_heads // 2),
        head_dim=32,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config)
    rows = torch.tensor(
        [tokenizer(problem(a, b) + completion(demo.task, a, b))["input_ids"] + [tokenizer.eos_token_id] for a, b in pairs]
    )  # (P, 6 + T): 6 prompt tokens, T completion tokens: the characters (as long in every completion of a task), EOS
    lr = spec.sft_lr if spec.sft_lr is not None else demo.sft_lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=spec.sft_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    for _ in range(spec.sft_steps):
        batch = rows[torch.randint(len(rows), (demo.sft_batch_size,), generator=generator)]
        logits = model(input_ids=batch).logits[:, 5:-1]  # positions predicting the completion and EOS
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 6:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()




@torch.no_grad()
def greedy_accuracy(
    model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[int, int]], task: str
) -> float:
    """Share of `pairs` whose greedy completion is exactly the task's completion (`completion`)."""
    prompts = torch.tensor([tokenizer(problem(a, b))["input_ids"] for a, b in pairs])  # (P, 6)
    width = len(completion(task, 0, 0))
    out = model.generate(prompts, max_new_tokens=width + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, prompts.shape[1] :], skip_special_tokens=True)
    return sum(text == completion(task, a, b) for text, (a, b) in zip(texts, pairs)) / max(len(pairs), 1)


def build_assets(folder: str | Path, spec: DemoSpec | None = None) -> Path:
    """Write the demo's data, tokenizer, student and teacher under `folder`; reuse them when cached.

    Returns:
        `folder`, holding `train.jsonl`, `heldout.jsonl`, `student/` and `teacher/`.
    Raises:
        RuntimeError: the teacher's SFT did not converge (under `DemoSpec.teacher_min_accuracy` greedy
            held-out accuracy); nothing is stamped, so the next call builds again.
    """
    spec = spec or DemoSpec()
    folder = Path(folder)
    stamp = folder / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        log.info("demo assets cached in %s", folder)
        return folder
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out = _split(spec)
    if spec.task not in ("answer", "trace"):
        raise ValueError(f"DemoSpec.task must be answer or trace; got {spec.task!r}")
    _write_jsonl(folder / "train.jsonl", train, spec.task)
    _write_jsonl(folder / "heldout.jsonl", held_out, spec.task)
    tokenizer = make_tokenizer("".join(CHARACTERS) + (";" if spec.task == "trace" else ""))
    carry_free = [(a, b) for a, b in train if a % 10 + b % 10 < 10]
    for name in ("teacher", "student"):
        pairs = carry_free if name == "student" and not spec.student_sees_carries else train
        model_spec = getattr(spec, name)
        for attempt in range(spec.teacher_attempts if name == "teacher" else 1):
            model = _train_sft(replace(model_spec, seed=model_spec.seed + attempt), tokenizer, pairs, spec)
            accuracy = greedy_accuracy(model, tokenizer, held_out, spec.task)
            log.info("demo %s trained (seed %d): %.1f%% greedy held-out accuracy (%.0f s so far)", name,
                     model_spec.seed + attempt, 100 * accuracy, time.perf_counter() - start)
            if name == "student" or accuracy >= spec.teacher_min_accuracy:
                break
        else:
            raise RuntimeError(
                f"the demo teacher reached only {100 * accuracy:.1f}% greedy held-out accuracy (under "
                f"{100 * spec.teacher_min_accuracy:.0f}%) with {spec.teacher_attempts} SFT seeds: its SFT did not converge; "
                "change DemoSpec.teacher (sft_steps) or DemoSpec.sft_lr"
            )
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    stamp.write_text(json.dumps(asdict(spec), indent=2))
    return folder

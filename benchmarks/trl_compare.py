"""Step time of renio-pl against TRL's on-policy distillation trainer, same models, batch and lengths.

Both train the same random-weight Qwen3 student from the same random-weight Qwen3 teacher
(built here from a config, saved once, loaded by both) on the same prompts, rendered by the
same chat template, with the same settings: every step samples one completion of each of
`--batch` prompts with the current student (`--new-tokens` tokens, temperature 1, no top-k /
top-p), then takes one AdamW step on full-vocabulary forward KL(teacher || student), float32.

- renio-pl: `renio-pl fit`'s classes in a Lightning `Trainer`: `OnPolicyDataModule` with
  `prompts_per_epoch = batch_size = --batch` (one round, one step), `HFGenerator`,
  `DistillationModule(UniformWeighter, ForwardKL)`.
- TRL: `trl.DistillationTrainer` with `beta=0` (forward KL), `per_device_train_batch_size =
  --batch`, gradient checkpointing off (its default is on), HF `generate`.

A step's time is the wall time from the end of one optimizer step to the end of the next
(sampling included); the first step is left out as warm-up, the others are averaged.

TRL is a benchmark-only dependency; install it apart from the project, e.g.
    python -m venv /tmp/trl-venv
    printf '%s\n' "$PWD/.venv/lib/python3.11/site-packages" "$PWD" \\
        > /tmp/trl-venv/lib/python3.11/site-packages/project.pth   # torch, transformers, renio_pl
    /tmp/trl-venv/bin/pip install --no-deps trl==1.16.0
    /tmp/trl-venv/bin/python benchmarks/trl_compare.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.demo.task import make_tokenizer
from renio_pl.losses import ForwardKL
from renio_pl.module import DistillationModule
from renio_pl.rollouts import HFGenerator, SamplingConfig
from renio_pl.weighters import UniformWeighter

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_models(folder: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """A student (hidden `hidden`) and a wider teacher (1.5x), random weights, one character tokenizer.

    The tokenizer has about `vocab` tokens (ASCII, then CJK characters), so that a random model
    rarely samples EOS (about 1 / `vocab` a token) and both suites sample full-length completions.
    """
    ascii_part = "0123456789+-*/=?() abcdefghijklmnopqrstuvwxyzW|<>\n"
    characters = ascii_part + "".join(chr(0x4E00 + i) for i in range(vocab - len(ascii_part) - 3))
    tokenizer = make_tokenizer(characters, CHAT_TEMPLATE)
    paths = {}
    for role, width, seed in (("student", hidden, 0), ("teacher", hidden * 3 // 2, 1)):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=layers, num_attention_heads=width // 32, num_key_value_heads=1,
                             head_dim=32, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                             bos_token_id=None, tie_word_embeddings=False)
        paths[role] = folder / role
        Qwen3ForCausalLM(config).save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def problems(count: int) -> list[str]:
    return [f"what is {a}*{a + 7}+{3 * a}?" for a in range(count)]


class StepEnds(pl.Callback):
    """Wall-clock time at the end of each optimizer step, and each batch's mean completion length (Lightning)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.lengths: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.lengths.append(batch.completion_mask.sum(dim=1).float().mean().item())


class TrainerStepEnds(TrainerCallback):
    """The same for a transformers `Trainer`."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, *args, **kwargs) -> None:
        self.ends.append(time.perf_counter())


def step_seconds(ends: list[float]) -> list[float]:
    """Seconds of each step after the first."""
    return [b - a for a, b in zip(ends, ends[1:])]


def run_renio(paths: dict[str, Path], folder: Path, args) -> tuple[list[float], float]:
    """Seconds of each step after the first, and the mean completion length."""
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in problems(args.batch * (args.steps + 1))))
    pl.seed_everything(0)
    module = DistillationModule(str(paths["student"]), str(paths["teacher"]), UniformWeighter(), ForwardKL(),
                                optimizer=partial(torch.optim.AdamW, lr=1e-5), evaluate_before_fit=False,
                                diagnostics=None)
    data = OnPolicyDataModule(str(prompts), tokenizer=str(paths["student"]), answer_field=None,
                              sampling=SamplingConfig(n=1, temperature=1.0, max_new_tokens=args.new_tokens),
                              prompts_per_epoch=args.batch, batch_size=args.batch, engine=HFGenerator(args.batch))
    times = StepEnds()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + 1, max_epochs=-1,
                         reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[times], default_root_dir=str(folder))
    trainer.fit(module, data)
    return step_seconds(times.ends), statistics.mean(times.lengths)


def run_trl(paths: dict[str, Path], folder: Path, args) -> tuple[list[float], float]:
    """Seconds of each step after the first, and the mean completion length (TRL's own log)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in problems(args.batch * (args.steps + 1))])
    config = DistillationConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps + 1, learning_rate=1e-5, bf16=False, fp16=False, gradient_checkpointing=False,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, use_cpu=True,
        logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
    )
    times = TrainerStepEnds()
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(paths["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]),
        args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(paths["student"]),
        callbacks=[times],
    )
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return step_seconds(times.ends), float(lengths[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="prompts (rollouts) per step")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of each rollout")
    parser.add_argument("--hidden", type=int, default=128, help="the student's hidden size (teacher: 1.5x)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the tokenizer and models")
    parser.add_argument("--steps", type=int, default=8, help="timed steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = save_models(folder, args.hidden, args.layers, args.vocab)
        results = {"renio-pl": run_renio(paths, folder, args), f"trl {trl.__version__}": run_trl(paths, folder, args)}
    print(f"batch {args.batch} x {args.new_tokens} new tokens, vocabulary {args.vocab}, student hidden {args.hidden} x "
          f"{args.layers} layers, teacher hidden {args.hidden * 3 // 2}, CPU float32, torch threads {torch.get_num_threads()}")
    print(f"{'suite':<12} {'steps':>5} {'mean s/step':>12} {'median':>8} {'mean length':>12}")
    for suite, (times, length) in results.items():
        print(f"{suite:<12} {len(times):>5} {statistics.mean(times):>12.3f} {statistics.median(times):>8.3f} {length:>12.1f}")
    (ours, _), (theirs, _) = results.values()
    print(f"step time ratio TRL / renio-pl: {statistics.mean(theirs) / statistics.mean(ours):.2f} (means), "
          f"{statistics.median(theirs) / statistics.median(ours):.2f} (medians)")


if __name__ == "__main__":
    main()

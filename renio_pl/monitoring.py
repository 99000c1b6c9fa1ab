"""What a run shows while it trains: per-step vitals, sample completions, log lines, logger errors.

`TrainingMonitor` (a callback; `renio-pl` adds it to every run, configured under `monitor:`)
logs, every training step:

    train/lr                 learning rate of the optimizer's first parameter group
    train/grad_norm          total L2 norm of the student's gradients, before any clipping
    rollout/truncated_share  share of the batch's completions that stopped at max_new_tokens
                             (no EOS)
    time/scoring_s           seconds of the forward pass (scoring under student and teacher)
    time/update_s            seconds of the backward pass and the optimizer step
    memory/peak_gib          peak accelerator memory since the previous step (CUDA only)

and once per round, at its first step, `time/sampling_s` (seconds the round's rollouts took,
grading included) and `rollout/tokens_per_s` (generated tokens per second of it, per process).
Every round it also writes a small table of sample completions with their weights and
verdicts: to `completions.jsonl` and `completions.md` in the run folder, to W&B as a table
and to TensorBoard as text.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from renio_pl.history import add_history

__all__ = ["TrainingMonitor", "RoundStats", "truncated", "completion_table", "configure_logging",
           "missing_package_message"]

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """What sampling a training round cost on this process.

    Attributes:
        epoch: the round.
        seconds: wall time of sampling the round (generation and grading; TRD: and rewriting).
        completions: rollouts sampled.
        tokens: their completion tokens.
    """

    epoch: int
    seconds: float
    completions: int
    tokens: int

    @classmethod
    def of(cls, epoch: int, rollouts: list, seconds: float) -> RoundStats:
        """Stats of a round's `Rollout`s, sampled in `seconds`."""
        return cls(epoch, seconds, len(rollouts), sum(len(r.completion_ids) for r in rollouts))

    def metrics(self) -> dict[str, float]:
        return {"time/sampling_s": self.seconds, "rollout/tokens_per_s": self.tokens / max(self.seconds, 1e-9)}


def truncated(completion_ids: Tensor, completion_mask: Tensor, eos_ids: list[int]) -> Tensor:
    """Which completions were cut off: their last token is not an EOS (they reached max_new_tokens).

    Args:
        completion_ids: (B, T) int64, right-padded.
        completion_mask: (B, T) bool, True on generated tokens.
        eos_ids: the EOS token ids generation stops at.
    Returns:
        (B,) bool.
    """
    last = (completion_mask.sum(dim=1) - 1).clamp(min=0)  # (B,)
    last_tokens = completion_ids.gather(1, last[:, None]).squeeze(1)  # (B,)
    return ~torch.isin(last_tokens, torch.tensor(eos_ids, device=completion_ids.device))


def completion_table(batch, tokenizer, weights: Tensor | None, eos_ids: list[int], rows: int, max_chars: int) -> list[dict]:
    """The first `rows` rollouts of a `RolloutBatch` as records: prompt, completion, weight, verdict, length.

    Args:
        batch: a `RolloutBatch` (`input_ids` (B, T_prompt + T), `completion_mask` (B, T), `texts`, `correct` (B,)).
        weights: (B,) the rollouts' weights, or None when the module exposes none.
    """
    lengths = batch.completion_mask.sum(dim=1).tolist()
    cut = truncated(batch.completion_ids, batch.completion_mask, eos_ids).tolist()
    records = []
    for b in range(min(rows, batch.input_ids.shape[0])):
        prompt_ids = batch.input_ids[b, : batch.prompt_length][batch.attention_mask[b, : batch.prompt_length].bool()]
        completion = batch.texts[b] if batch.texts else tokenizer.decode(batch.completion_ids[b, : lengths[b]])
        records.append({
            "prompt": _shorten(tokenizer.decode(prompt_ids, skip_special_tokens=True), max_chars),
            "completion": _shorten(completion, max_chars),
            "weight": None if weights is None else round(float(weights[b]), 4),
            "correct": None if batch.correct is None else bool(batch.correct[b] > 0.5),
            "tokens": int(lengths[b]),
            "truncated": bool(cut[b]),
        })
    return records


def _shorten(text: str, max_chars: int) -> str:
    text = text.strip()
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def markdown_table(records: list[dict]) -> str:
    """Records as a markdown table (`|` and newlines escaped)."""
    if not records:
        return ""
    columns = list(records[0])

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


class TrainingMonitor(pl.Callback):
    """Logs each training step's learning rate, gradient norm, truncation, stage times and memory.

    Also records the run's metric history (`history.jsonl`, `renio_pl.history`) and, every
    round, a table of sample completions (see the module docstring for every name logged).

    Args:
        sample_completions: rollouts per round in the completions table (0: no table).
        max_chars: prompts and completions are cut to this many characters in the table.
    """

    def __init__(self, sample_completions: int = 4, max_chars: int = 400) -> None:
        if sample_completions < 0:
            raise ValueError(f"monitor.sample_completions must be >= 0; got {sample_completions}")
        if max_chars < 8:
            raise ValueError(f"monitor.max_chars must be >= 8; got {max_chars}")
        self.sample_completions, self.max_chars = sample_completions, max_chars
        self.folder: Path | None = None
        self._eos_ids: list[int] | None = None
        self._batch_start = self._backward_start = None
        self._logged_round: int | None = None
        self._step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.folder = add_history(trainer).folder

    # --- timing: batch start -> (forward) -> before backward -> (backward, step) -> batch end ------
    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch's metrics are logged at
        if self._logged_round != trainer.current_epoch:  # the round's first step: what sampling it cost
            stats = getattr(trainer.datamodule, "round_stats", None) if trainer.datamodule is not None else None
            if stats is not None and stats.epoch == trainer.current_epoch:  # sampled in this process (not restored)
                for logger in trainer.loggers:  # once, not repeated at every later step as `log` would
                    logger.log_metrics(stats.metrics(), step=self._step)
        self._batch_start, self._backward_start = self._now(pl_module), None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._backward_start = self._now(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Learning rate and the gradients' norm, after accumulation and before clipping."""
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        metrics = {"train/lr": float(optimizer.param_groups[0]["lr"])}
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            metrics["train/grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = self._now(pl_module)
        metrics: dict[str, float] = {}
        if self._batch_start is not None:
            forward_end = self._backward_start if self._backward_start is not None else end
            metrics["time/scoring_s"] = forward_end - self._batch_start
            metrics["time/update_s"] = end - forward_end
        if pl_module.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        eos_ids = self._eos(trainer, pl_module)
        if eos_ids is not None and hasattr(batch, "completion_mask"):
            metrics["rollout/truncated_share"] = float(
                truncated(batch.completion_ids, batch.completion_mask, eos_ids).float().mean()
            )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self._logged_round != trainer.current_epoch:  # the round's first step
            self._logged_round = trainer.current_epoch
            if self.sample_completions and eos_ids is not None and hasattr(batch, "completion_mask"):
                self._log_completions(trainer, pl_module, batch, eos_ids)

    def _eos(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int] | None:
        """The student's EOS ids (None when the module or data module is not ours)."""
        if self._eos_ids is None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            student = getattr(pl_module, "student", None)
            if tokenizer is None or student is None:
                return None
            from renio_pl.rollouts import eos_token_ids

            self._eos_ids = eos_token_ids(student, tokenizer)
        return self._eos_ids

    def _log_completions(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, eos_ids: list[int]) -> None:
        """The round's sample completions: to the run folder, and to W&B / TensorBoard when they log the run."""
        if not trainer.is_global_zero:
            return
        weights = getattr(pl_module, "last_weights", None)
        records = completion_table(
            batch, trainer.datamodule.tokenizer, weights, eos_ids, self.sample_completions, self.max_chars
        )
        step, epoch = self._step, trainer.current_epoch
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / "completions.jsonl").open("a") as f:
                for record in records:
                    f.write(json.dumps({"step": step, "epoch": epoch, **record}, ensure_ascii=False) + "\n")
            with (self.folder / "completions.md").open("a") as f:
                f.write(f"## Round {epoch} (step {step})\n\n{markdown_table(records)}\n")
        columns = list(records[0]) if records else []
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table(key="completions", columns=columns, data=[[r[c] for c in columns] for r in records],
                                 step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                logger.experiment.add_text("completions", markdown_table(records), global_step=step)


def configure_logging(level: int = logging.INFO) -> None:
    """Show `renio_pl`'s log lines on stderr (as Lightning shows its own), unless the application set up logging."""
    package = logging.getLogger("renio_pl")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False


# Optional packages a config may need, and the renio-pl extra that installs each.
_EXTRAS = {"tensorboard": "tensorboard", "tensorboardX": "tensorboard", "wandb": "wandb", "deepspeed": "deepspeed",
           "mlflow": None, "comet_ml": None, "neptune": None}


def missing_package_message(error: BaseException | str) -> str | None:
    """One line naming the missing package and its install command, when `error` (or its cause) is an import of one.

    Lightning's loggers and strategies raise `ModuleNotFoundError` for their optional packages;
    jsonargparse wraps it in `ValueError`s, or reports it as a parse error's text. Returns None
    for any other error.
    """
    seen, texts = set(), []
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error} {getattr(error, 'name', '') or ''}")
        error = error.__cause__ or error.__context__
    if isinstance(error, str):
        texts.append(error)
    for text in texts:
        if not re.search(r"ModuleNotFoundError|No module named|not met|is available|not installed", text):
            continue
        names = [name for name in _EXTRAS if re.search(rf"(?<![\w-]){name}(?![\w-])", text)]
        if names:
            extra = _EXTRAS[names[0]]
            install = f"pip install 'renio-pl[{extra}]'" if extra else f"pip install {names[0]}"
            return f"this config needs the {names[0]} package, which is not installed: {install}"
    return None

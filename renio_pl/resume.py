"""Resuming a run: which checkpoint `--ckpt_path last` means, and whether it may be resumed.

A run's checkpoints carry the run's config (`SaveRunConfig`). `--ckpt_path last` resumes the
newest `last.ckpt` under the run's folders whose settings that shape training (model, loss,
weighter, optimizer, data and its sampling, prompts and seed, gradient clipping and accumulation,
precision) equal this run's. Options that only extend a run or change how it is watched (`max_epochs`,
`max_steps`, loggers, callbacks, evaluation settings, the rollout engine, memory options) may
differ. A checkpoint of a run that has already done all its training is not resumed. A resumed
run logs into a new logger version (`version_<n>`): Lightning's CSVLogger empties the
`metrics.csv` of a version folder it is pointed at again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback

__all__ = [
    "SaveRunConfig", "dump_config", "read_metadata", "training_settings", "first_difference", "checkpoint_settings", "find_own_checkpoint",
    "finished_training",
]

CONFIG_KEY = "renio_pl_config"  # where a checkpoint holds its run's config

# Keys (or their parents) under `model` and `data` that do not change what is trained.
_WATCHING = (
    "model.chunk_tokens", "model.gradient_checkpointing", "model.evaluate_before_fit", "model.pass_at_k",
    "model.diagnostics", "data.tokenizer", "data.val_path", "data.val_sampling", "data.val_batch_size",
    "data.test_sets", "data.test_sampling", "data.engine", "data.answer_extractor",
)
# Trainer options that change the updates (the others schedule, log or place the run).
_TRAINER_SHAPING = (
    "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
    "trainer.precision",
)


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's `config.yaml` writer that also stores the run's config in every checkpoint."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = dump_config(self.parser, self.config)


def dump_config(parser, config) -> dict[str, Any]:
    """A parsed LightningCLI config as plain data (what `config.yaml` holds)."""
    return yaml.safe_load(parser.dump(config, skip_none=False, skip_validation=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def training_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys of `config` (a run's config, as `config.yaml` holds it) that shape training, with values."""
    # Not `seed_everything`: LightningCLI draws a new one each run unless set, and a resumed run's
    # sampling and order are keyed by `data.seed`.
    flat = _flatten({k: config.get(k) for k in ("model", "data", "trainer")})
    shaping = {}
    for key, value in flat.items():
        if key.startswith(("model.", "data.")):
            if not any(key == w or key.startswith(w + ".") for w in _WATCHING):
                shaping[key] = value
        elif any(key == t or key.startswith(t + ".") for t in _TRAINER_SHAPING):
            shaping[key] = value
    return shaping


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first shaping key (in `current`'s order) set in both configs to different values, or None."""
    old, new = training_settings(saved), training_settings(current)
    for key, value in new.items():
        if key in old and old[key] != value:
            return key, old[key], value
    return None


def checkpoint_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The run config a checkpoint holds; for a checkpoint written without it, its module's hyper-parameters."""
    if CONFIG_KEY in checkpoint:
        return checkpoint[CONFIG_KEY]
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    return {"model": hparams}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's entries (a file; or a sharded folder's `meta.pt`; `{}` for a folder without one).

    The file is memory-mapped: its weights stay on disk unless used.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"  # FSDP2 (ModelParallelStrategy): the state besides model and optimizer
        if not path.is_file():
            return {}
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def find_own_checkpoint(trainer: pl.Trainer, config: dict[str, Any]) -> tuple[Path | None, str | None]:
    """This run's newest `last.ckpt` under the run's folders, or why none can be resumed.

    Returns:
        (checkpoint, None) for the newest `last.ckpt` (a file, or a sharded folder) whose training settings equal
        `config`'s; (None, reason) when there are `last.ckpt`s but none matches, the reason naming
        the first differing key of the newest; (None, None) when there is none.
    """
    roots = [Path(trainer.default_root_dir)]
    roots += [Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    found = {path for root in roots if root.is_dir() for path in root.rglob("last.ckpt")}
    candidates = sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)
    for path in candidates:
        if first_difference(checkpoint_settings(read_metadata(path)), config) is None:
            return path, None
    if not candidates:
        return None, None
    key, old, new = first_difference(checkpoint_settings(read_metadata(candidates[0])), config)
    return None, (
        f"--ckpt_path last: {candidates[0]} was trained with {key}={old!r}, this run sets {new!r}; resume with the "
        "run's own settings, or start a new run without --ckpt_path (or with another trainer.default_root_dir)"
    )


def finished_training(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> str | None:
    """Why the run of `checkpoint` has no training left under this trainer's limits, or None when it has."""
    steps = checkpoint.get("global_step", 0)
    if trainer.max_steps != -1 and steps >= trainer.max_steps:
        return f"it reached trainer.max_steps={trainer.max_steps} (step {steps})"
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = loop.get("epoch_progress", {}).get("current", {}).get("processed", 0)
    batches = loop.get("epoch_loop.batch_progress", {})
    if batches.get("is_last_batch") and batches["current"]["processed"] >= batches["current"]["ready"]:
        epochs += 1  # saved after the last batch of an epoch, before the epoch's end was counted
    max_epochs = trainer.fit_loop.max_epochs
    if max_epochs is not None and max_epochs != -1 and epochs >= max_epochs:
        return f"it trained all trainer.max_epochs={max_epochs} epochs (step {steps})"
    return None

"""Checkpoints that a kill cannot corrupt: written beside their target, synced, then renamed.

Lightning's `TorchCheckpointIO` stages the bytes in the system temp folder and moves them
into place; when that folder is on another file system (a tmpfs `/tmp`, a scratch disk),
the move is a copy, and a job killed during it leaves a truncated `last.ckpt`. Here the
bytes go to a temporary file in the checkpoint's own folder, are flushed to disk, and
`os.replace` swaps the file in one step: a reader sees the old checkpoint or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on local file systems (use in `trainer.plugins`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with staging.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

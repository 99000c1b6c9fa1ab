"""Every process of a run stops together: on SIGTERM with a checkpoint, on a failure without leftovers.

`renio-pl fit` adds `StopTogether` to every trainer. On SIGTERM (a cluster scheduler's warning
before it preempts a job), to any process of the run,
each process finishes the optimizer step in progress, the run writes `last.ckpt` (in the
checkpoint callback's folder, else `<default_root_dir>/checkpoints`), and every process exits
with status 143 (128 + SIGTERM). `--ckpt_path last` resumes from it to the tokens, losses and
weights of an uninterrupted run.

Lightning's own SIGTERM notifier sets `trainer.received_sigterm` and broadcasts it from inside
the signal handler; a handler runs between two Python bytecodes, possibly while the other
processes wait in a collective of their own, and the two collectives then cross. Here the
handler only takes note (and forwards the signal to the processes Lightning launched, as
Lightning does); the processes agree at the end of every training step, in one collective
they all reach, and all set Lightning's `received_sigterm` there, so Lightning's loops stop
them after the same step (`SIGTERMException`).

When a process fails (an error, or a collective past the strategy's `timeout` because another
process died or hangs), the processes Lightning launched from it are killed rather than left
waiting; a process that dies is seen by the others at their next collective.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["StopTogether", "SIGTERM_EXIT_STATUS"]

SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


class StopTogether(pl.Callback):
    """Stops every process after the same training step once any of them got SIGTERM, with `last.ckpt` written;
    kills the processes this one launched when it fails."""

    def __init__(self) -> None:
        self.requested = False
        self._trainer: pl.Trainer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after this hook, from this attribute: ours takes its place.
        self.requested, self._trainer = False, trainer
        trainer._signal_connector._sigterm_notifier_fn = self._take_note

    def _take_note(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested and self._trainer is not None and self._trainer.strategy.launcher is not None:
            self._trainer.strategy.launcher.kill(signum)  # the ranks this process launched
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        asked = torch.tensor(float(self.requested), device=pl_module.device)
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce(asked, reduce_op="sum")  # every process, every step: they agree
        if asked.item() == 0:
            return
        path = checkpoint_folder(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"SIGTERM: stopped after step {trainer.global_step}, epoch {trainer.current_epoch}; wrote {path}: "
            "resume with --ckpt_path last"
        )
        trainer._signal_connector.received_sigterm = True  # Lightning's loops stop every process after this step


    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) or trainer.strategy.launcher is None:
            return  # a stop on SIGTERM is orderly: every process saves and exits by itself
        trainer.strategy.launcher.kill(signal.SIGKILL)  # Lightning does so only on Ctrl-C


def checkpoint_folder(trainer: pl.Trainer) -> Path:
    """The checkpoint callback's folder, else `<default_root_dir>/checkpoints` (where `--ckpt_path last` looks)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"

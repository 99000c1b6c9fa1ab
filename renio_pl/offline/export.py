"""SaveStudent: the trained student as a `save_pretrained` folder, for the next stage or `renio-pl test`."""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from renio_pl.export import save_student
from renio_pl.models import load_tokenizer

__all__ = ["SaveStudent"]

log = logging.getLogger(__name__)


class SaveStudent(pl.Callback):
    """At the end of `fit`, writes the student's weights (LoRA merged in) and tokenizer to a folder.

    The folder loads like any checkpoint folder: REDI's stage 2 starts from it
    (`model.student: <folder>`), and `renio-pl test --model.student <folder>` evaluates it.
    With a sharded strategy (FSDP, DeepSpeed) the weights are not gathered: use DDP or one device.

    Args:
        folder: where to write (created; files already there are overwritten).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = save_student(pl_module.student, load_tokenizer(pl_module.hparams.student), self.folder)
        log.info("student saved to %s", folder)

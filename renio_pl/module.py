"""DistillationModule: wires scoring -> weighting -> loss for a trainable student and a frozen teacher.

`training_step` reads as the data flow: score the batch's completion tokens under both
models (`logprobs`), weight each rollout (`weighters`), reduce to the batch loss (`losses`).
The teacher is held outside the module's registered children: it is never in the optimizer,
never in a checkpoint, always in eval mode and only run under `no_grad`.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from renio_pl.errors import ConfigError
from renio_pl.losses import ForwardKL, Loss, weighted_loss
from renio_pl.logprobs import TokenScores, completion_hidden_states, score_tokens
from renio_pl.models import DType, LoRA, check_same_vocabulary, load_model, load_tokenizer
from renio_pl.rollouts import RolloutBatch
from renio_pl.weighters import UniformWeighter, Weighter, WeighterInputs

__all__ = ["DistillationModule"]

log = logging.getLogger(__name__)


class DistillationModule(pl.LightningModule):
    """On-policy distillation of a student from a frozen teacher with per-rollout weights.

    Args:
        student: hub id or local folder of the trainable student.
        teacher: hub id or local folder of the frozen teacher (same tokenizer as the student).
        weighter: how much each rollout counts (`renio_pl.weighters`).
        loss: the per-token objective (`renio_pl.losses`).
        dtype: dtype both models are loaded in.
        student_lora: train a LoRA adapter instead of the full student.
        optimizer: optimizer over the student's trainable parameters.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        chunk_tokens: generated positions turned into full-vocabulary logits at once.
        evaluate_before_fit: log held-out accuracy at step 0, before the first update.
    """

    def __init__(
        self,
        student: str,
        teacher: str,
        weighter: Weighter = lazy_instance(UniformWeighter),
        loss: Loss = lazy_instance(ForwardKL),
        dtype: DType = "float32",
        student_lora: LoRA | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int = 4096,
        evaluate_before_fit: bool = True,
    ) -> None:
        super().__init__()
        if chunk_tokens < 1:
            raise ConfigError(f"model.chunk_tokens must be >= 1; got {chunk_tokens}")
        self.save_hyperparameters(ignore=["weighter", "loss", "optimizer", "lr_scheduler"])
        self.weighter = weighter
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.chunk_tokens = chunk_tokens
        self.evaluate_before_fit = evaluate_before_fit
        self.student = load_model(student, dtype, student_lora, option="model.student").train()
        teacher_model = load_model(teacher, dtype, option="model.teacher")
        check_same_vocabulary(
            self.student, teacher_model, load_tokenizer(student), load_tokenizer(teacher, option="model.teacher")
        )
        teacher_model.requires_grad_(False).eval()
        self._frozen = [teacher_model]  # a list, so the teacher is not a registered child
        self.val_accuracy = MeanMetric()

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher (eval mode, no gradients, not in the state dict)."""
        return self._frozen[0]

    def _place_teacher(self) -> None:
        self.teacher.to(self.device).eval()

    def on_fit_start(self) -> None:
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    # --- the data flow -----------------------------------------------------------------------
    def score(self, batch: RolloutBatch) -> TokenScores:
        """Log-probs, entropy and token losses of the batch's completion tokens (B, T)."""
        student_hidden = completion_hidden_states(
            self.student, batch.input_ids, batch.attention_mask, batch.prompt_length
        )  # (B, T, H_S)
        with torch.no_grad():
            teacher_hidden = completion_hidden_states(
                self.teacher, batch.input_ids, batch.attention_mask, batch.prompt_length
            )  # (B, T, H_T)
        return score_tokens(
            student_hidden,
            self.student.get_output_embeddings(),
            teacher_hidden,
            self.teacher.get_output_embeddings(),
            batch.completion_ids,
            batch.completion_mask,
            batch.temperature,
            self.loss,
            self.chunk_tokens,
        )

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor:
        scores = self.score(batch)
        inputs = WeighterInputs(
            scores.student_logprobs, scores.teacher_logprobs, batch.completion_mask, scores.student_entropy, batch.correct
        )
        weights = self.weighter(inputs)  # (B,)
        loss = weighted_loss(scores.token_loss, batch.completion_mask, weights)
        self._log_training(batch, inputs, weights, loss)
        return loss

    def _log_training(self, batch: RolloutBatch, inputs: WeighterInputs, weights: Tensor, loss: Tensor) -> None:
        mask = batch.completion_mask
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "train/loss": loss.detach(),
            "train/kl": inputs.log_ratio().nan_to_num(posinf=0.0, neginf=0.0).sum() / tokens,
            "rollout/len_mean": mask.sum(dim=1).float().mean(),
            "weights/kept_share": (weights > 0).float().mean(),
        }
        metrics.update({f"weights/{k}": v for k, v in self.weighter.statistics(inputs, weights).items()})
        if batch.correct is not None:
            metrics["rollout/accuracy"] = batch.correct.mean()
        self.log_dict(metrics, batch_size=mask.shape[0], prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=mask.shape[0])

    # --- held-out accuracy -------------------------------------------------------------------
    def validation_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        if batch.correct is None:
            return
        self.val_accuracy.update(batch.correct)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=batch.correct.shape[0])

    def on_train_start(self) -> None:
        """Held-out accuracy of the initial student, logged at step 0."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.evaluate_before_fit or datamodule is None or not getattr(datamodule, "val_rows", None):
            return
        metric = MeanMetric().to(self.device)
        for batch in datamodule.val_dataloader():
            if batch.correct is not None:
                metric.update(batch.correct.to(self.device))
        accuracy = float(metric.compute())
        for logger in self.loggers:
            logger.log_metrics({"val/accuracy": accuracy}, step=0)
        if self.trainer.is_global_zero:
            log.info("held-out accuracy before training: %.4f", accuracy)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""OfflineDistillationModule: the student learns from fixed teacher traces (REDI's SFT and REDI stages).

`training_step` reads as the offline data flow: score every completion token of the batch's
traces under the student (`renio_pl.logprobs.token_logprobs`, chunked over tokens so that `(R, T, V)` logits
never exist at once), then reduce them with the `TraceLoss` the config picks
(`renio_pl.losses.SFTLoss` for stage 1, `REDILoss` for stage 2). There is no teacher model
and no weighter: the teacher's knowledge is in the traces, its quality in their labels.

Loading the student, held-out accuracy, benchmarks (`test` / `predict`), the optimizer and
scheduler and the divergence guard are `renio_pl.student.StudentModule`'s, shared with
on-policy distillation.

Shapes use the package glossary (`renio_pl/__init__.py`): `B` records, `R` rows (`B` positives, then `B`
negatives in stage `redi`), `T` completion tokens, `H` hidden size, `V` vocabulary, `N` the
batch's completion tokens packed.
"""

from __future__ import annotations

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from renio_pl.errors import ConfigError
from renio_pl.guards import check_fit_setup
from renio_pl.logprobs import completion_hidden_states, token_logprobs
from renio_pl.losses import SFTLoss, TraceLoss, length_normalized_logprobs
from renio_pl.models import DType, LoRA
from renio_pl.paths import InputPath
from renio_pl.offline.datamodule import TraceBatch, TraceDataModule
from renio_pl.rollouts import RolloutBatch
from renio_pl.student import StudentModule, components_outside_cli

__all__ = ["OfflineDistillationModule"]


class OfflineDistillationModule(StudentModule):
    """SFT or REDI of a student on offline teacher traces (`TraceDataModule`).

    Args:
        student: hub id or local folder of the trainable student (for stage 2, the folder the
            SFT run wrote with `renio_pl.offline.SaveStudent`).
        objective: `renio_pl.losses.SFTLoss` (stage 1) or `renio_pl.losses.REDILoss` (stage 2);
            `renio-pl-redi` sets the data module's `stage` from it (`sft` or `redi`).
        dtype: dtype the student is loaded in (keep float32 under `bf16-mixed` for a learning
            rate as small as REDI's 1e-6: bf16 weights would round most updates away).
        student_lora: train a LoRA adapter instead of the full student.
        optimizer: optimizer over the student's trainable parameters.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        chunk_tokens: completion positions turned into full-vocabulary logits at once.
        gradient_checkpointing: recompute each decoder layer's activations in the backward
            (long traces; the REDI authors train with it on).
        evaluate_before_fit: log held-out accuracy at step 0, before the first update.
        pass_at_k: the k of each pass@k reported next to Avg@k and maj@k.
    """

    def __init__(
        self,
        student: InputPath,
        objective: TraceLoss = lazy_instance(SFTLoss),
        dtype: DType = "float32",
        student_lora: LoRA | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int = 4096,
        gradient_checkpointing: bool = False,
        evaluate_before_fit: bool = True,
        pass_at_k: list[int] = [4],
    ) -> None:
        super().__init__(
            student, dtype=dtype, student_lora=student_lora, optimizer=optimizer, lr_scheduler=lr_scheduler,
            chunk_tokens=chunk_tokens, gradient_checkpointing=gradient_checkpointing,
            evaluate_before_fit=evaluate_before_fit, pass_at_k=pass_at_k,
        )
        self.save_hyperparameters(ignore=components_outside_cli("objective", "optimizer", "lr_scheduler"))
        self.objective = objective

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and not isinstance(datamodule, TraceDataModule):
            raise ConfigError(
                f"OfflineDistillationModule trains on teacher traces, not on {type(datamodule).__name__}; "
                "use renio_pl.offline.TraceDataModule (renio-pl-redi fit)"
            )
        super().setup(stage)

    def on_fit_start(self) -> None:
        """Nothing to load: there is no teacher (`TraceDataModule.setup` has checked the objective against its stage)."""
        check_fit_setup(self.trainer, self)  # fp32 master weights, a new record order per epoch

    # --- the data flow -----------------------------------------------------------------------
    def completion_logprobs(self, completions: RolloutBatch) -> Tensor:
        """(R, T) float32 student log-prob of each completion token, 0 off `completion_mask`."""
        hidden = completion_hidden_states(
            self.student, completions.input_ids, completions.attention_mask, completions.prompt_length
        )  # (R, T, H)
        return token_logprobs(
            hidden, self.student.get_output_embeddings(), completions.completion_ids, completions.completion_mask,
            self.chunk_tokens,
        )

    def training_step(self, batch: TraceBatch, batch_idx: int) -> Tensor:
        logprobs = self.completion_logprobs(batch.completions)  # (R, T)
        positive, negative = batch.split(logprobs)  # (B, T), (B, T) or None
        positive_mask, negative_mask = batch.split(batch.completions.completion_mask)
        loss = self.objective(positive, positive_mask, negative, negative_mask)
        non_finite = self.trainer.strategy.reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
        if non_finite:  # stop every process before the update
            self._diverged(f"the training loss is not finite (here {loss.item()})")
        self._log_traces(loss, positive, positive_mask, negative, negative_mask)
        return loss

    def _log_traces(
        self, loss: Tensor, positive: Tensor, positive_mask: Tensor, negative: Tensor | None,
        negative_mask: Tensor | None,
    ) -> None:
        metrics = {
            "train/loss": loss.detach(),
            "train/positive_logprob": length_normalized_logprobs(positive.detach(), positive_mask).mean(),
            "traces/positive_len": positive_mask.sum(dim=1).float().mean(),
        }
        if negative is not None:
            metrics["train/negative_logprob"] = length_normalized_logprobs(negative.detach(), negative_mask).mean()
            metrics["traces/negative_len"] = negative_mask.sum(dim=1).float().mean()
        batch_size = positive.shape[0]
        self.log_dict(metrics, batch_size=batch_size, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)

    def on_train_start(self) -> None:
        """As `StudentModule`'s (held-out accuracy at step 0), plus the trace counts."""
        super().on_train_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.global_step > 0 or not isinstance(datamodule, TraceDataModule):
            return
        counts = {"data/traces": float(len(datamodule.traces)), "data/dropped_traces": float(datamodule.dropped_traces)}
        for logger in self.loggers:
            logger.log_metrics(counts, step=0)

"""StudentModule: the trainable student and what every way of training it shares.

It owns loading the student (full or LoRA, optionally sharded with FSDP2), the optimizer and
its schedule, the divergence guard (a non-finite update stops every process before any
checkpoint of it) and evaluation: held-out accuracy during `fit` (and at step 0), benchmark
metrics in `test`, completion records in `predict`. Its two subclasses add only their own
training: `renio_pl.module.DistillationModule` (on-policy: a teacher, a weighter, a loss) and
`renio_pl.offline.OfflineDistillationModule` (fixed teacher traces: an objective).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.nn import ModuleDict

from renio_pl.contracts import evaluation_data
from renio_pl.diagnostics import GroupAccuracy
from renio_pl.errors import ConfigError, TrainingDiverged
from renio_pl.evaluators.accuracy import accuracy_metrics, completion_record, compute_accuracy, update_accuracy
from renio_pl.models import DType, LoRA, load_model
from renio_pl.parallel import shard_student
from renio_pl.paths import InputPath
from renio_pl.rollouts import Rollout, SamplingConfig

__all__ = ["StudentModule", "components_outside_cli"]

log = logging.getLogger(__name__)


class StudentModule(pl.LightningModule):
    """A trainable student with its optimizer, divergence guard and evaluation; subclasses add `training_step`.

    Subclasses call `save_hyperparameters` themselves (with `components_outside_cli` of their
    own components), so that `load_from_checkpoint` rebuilds them.

    Args:
        student: hub id or local folder of the trainable student.
        dtype: dtype the student is loaded in.
        student_lora: train a LoRA adapter instead of the full student.
        optimizer: optimizer over the student's trainable parameters.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        chunk_tokens: completion positions turned into full-vocabulary logits at once.
        gradient_checkpointing: recompute each student decoder layer's activations in the
            backward instead of keeping them (long completions or large micro-batches).
        evaluate_before_fit: log held-out accuracy at step 0, before the first update.
        pass_at_k: the k of each pass@k reported next to Avg@k and maj@k (those above the
            samples per problem are left out).
    """

    def __init__(
        self,
        student: InputPath,
        dtype: DType = "float32",
        student_lora: LoRA | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int = 4096,
        gradient_checkpointing: bool = False,
        evaluate_before_fit: bool = True,
        pass_at_k: list[int] = [4],
    ) -> None:
        super().__init__()
        if chunk_tokens < 1:
            raise ConfigError(f"model.chunk_tokens must be >= 1; got {chunk_tokens}")
        if any(k < 1 for k in pass_at_k):
            raise ConfigError(f"model.pass_at_k values must be >= 1; got {pass_at_k}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.chunk_tokens = chunk_tokens
        self.evaluate_before_fit = evaluate_before_fit
        self.pass_at_k = list(pass_at_k)
        self.student = load_model(student, dtype, student_lora, option="model.student").train()
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def configure_model(self) -> None:
        """Shards the student with FSDP2 under `ModelParallelStrategy` (`renio_pl.parallel`); other strategies wrap it."""
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_student(self.student, self.device_mesh)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The update; then stops the run, before any checkpoint of it, if it made a weight NaN or inf."""
        super().optimizer_step(*args, **kwargs)
        norm = torch.nn.utils.get_total_norm([p for p in self.student.parameters() if p.requires_grad])
        if not torch.isfinite(norm):  # the same on every process: DDP keeps the weights equal
            self._diverged("the update made the student's weights NaN or inf")

    def _diverged(self, what: str, fix: str = "lower the learning rate or check the data") -> None:
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or None
        raise TrainingDiverged(
            f"{what} at step {self.global_step}, epoch {self.current_epoch}; the last good checkpoint is "
            f"{checkpoint or 'none (no checkpoint was written)'}; {fix}, "
            "then resume from it with --ckpt_path"
        )

    # --- evaluation: held-out accuracy during fit, benchmarks in test ------------------------
    def setup(self, stage: str) -> None:
        """Builds the accuracy metrics of the stage (samples per problem come from the data module)."""
        data = evaluation_data(self.trainer)
        if stage in ("fit", "validate"):
            self.val_metrics = accuracy_metrics(_samples_per_problem(data.val_sampling if data is not None else None), self.pass_at_k)
            self.val_groups = GroupAccuracy()
        if stage == "test":
            n = _samples_per_problem(data.test_sampling if data is not None else None)
            self.test_metrics = ModuleDict({
                eval_set.name: accuracy_metrics(
                    n, self.pass_at_k, majority=eval_set.verifier is None or eval_set.verifier.majority_vote
                )
                for eval_set in (data.test_sets if data is not None else [])
            })

    def validation_step(self, batch: list[Rollout], batch_idx: int) -> None:
        update_accuracy(self.val_metrics, batch, self.device)
        graded = [r for r in batch if r.correct is not None]
        self.val_groups.update([r.group for r in graded], torch.tensor([float(r.correct) for r in graded]))

    def _validation_results(self) -> dict[str, float]:
        """Held-out metrics as logged (`val/...`, with `val/group_accuracy/<group>` when the data has groups); then reset."""
        results = _validation_names(compute_accuracy(self.val_metrics))
        if self.val_groups.update_called:
            results.update({f"val/group_accuracy/{g}": value for g, value in self.val_groups.compute().items()})
        self.val_groups.reset()
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_metrics.reset()
            self.val_groups.reset()
            return
        results = self._validation_results()
        if results:
            self.log_dict(results, prog_bar=True, sync_dist=True)  # equal on every rank already

    def test_step(self, batch: list[Rollout], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        update_accuracy(list(self.test_metrics.values())[dataloader_idx], batch, self.device)
        return [completion_record(rollout) for rollout in batch]

    def on_test_epoch_end(self) -> None:
        for name, metrics in self.test_metrics.items():
            results = compute_accuracy(metrics)
            self.log_dict({f"test/{name}/{metric}": value for metric, value in results.items()}, sync_dist=True)

    def predict_step(self, batch: list[Rollout], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return [completion_record(rollout) for rollout in batch]

    def on_train_start(self) -> None:
        """Prompts dropped for length, and held-out accuracy of the initial student, logged at step 0."""
        if self.global_step > 0:  # a resumed run logged them when it started
            return
        data = evaluation_data(self.trainer)
        metrics = {"data/dropped_prompts": float(data.dropped_prompts if data is not None else 0)}
        if self.evaluate_before_fit and data is not None and data.val_rows:
            for batch in data.val_dataloader():
                self.validation_step(batch, 0)
            metrics.update(self._validation_results())
            if self.trainer.is_global_zero and "val/accuracy" in metrics:
                log.info("held-out accuracy before training: %.4f", metrics["val/accuracy"])
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def components_outside_cli(*names: str) -> list[str]:
    """The `save_hyperparameters` ignore list: the injected components, unless built by LightningCLI.

    LightningCLI hands the module its config, where each component is a class path and its
    init args: kept, so that `load_from_checkpoint` rebuilds the same weighter (with its
    state, e.g. ReNIO's EMA), loss and optimizer. Built directly, they are objects, which
    Lightning would pickle into the checkpoint: left out.
    """
    return [] if _given_hyperparameters.get() is not None else list(names)


def _samples_per_problem(sampling: SamplingConfig | None) -> int:
    """`n` of an evaluation stage's sampling settings (1 without them)."""
    return sampling.n if sampling is not None else 1


def _validation_names(results: dict[str, float]) -> dict[str, float]:
    """Validation metrics as logged: `val/accuracy` for Avg@n, the others under their own names."""
    return {f"val/{'accuracy' if name.startswith('avg@') else name}": value for name, value in results.items()}

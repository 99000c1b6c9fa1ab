"""DistillationModule: wires scoring -> weighting -> loss for a trainable student and a frozen teacher.

`training_step` reads as the data flow: score the batch's completion tokens under both
models (`logprobs`), weight each rollout (`weighters`), reduce to the batch loss (`losses`).
The teacher is held outside the module's registered children: it is never in the optimizer,
never in a checkpoint, always in eval mode and only run under `no_grad`. For OPSD (the data
module has `solution_field`) the teacher may be left out: the student's own base weights then
teach, through its adapter switched off (a LoRA student) or a frozen copy loaded from the
student's folder (a fully trained one), reading the privileged prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from renio_pl.contracts import evaluation_data
from renio_pl.diagnostics import Diagnostics
from renio_pl.errors import ConfigError
from renio_pl.guards import check_fit_setup
from renio_pl.losses import ForwardKL, Loss, rollout_losses, weighted_loss
from renio_pl.logprobs import TokenScores, completion_hidden_states, score_tokens, score_tokens_top_k
from renio_pl.models import DType, LoRA, check_same_vocabulary, load_model, load_tokenizer
from renio_pl.paths import InputPath
from renio_pl.rollouts import RolloutBatch
from renio_pl.student import StudentModule, components_outside_cli
from renio_pl.teacher_server import ServerTeacher, TeacherServerDown
from renio_pl.weighters import UniformWeighter, Weighter, WeighterInputs

__all__ = ["DistillationModule"]


class DistillationModule(StudentModule):
    """On-policy distillation of a student from a frozen teacher with per-rollout weights.

    The student, its optimizer, the divergence guard and evaluation are `StudentModule`'s.

    Args:
        student: hub id or local folder of the trainable student.
        teacher: hub id or local folder of the frozen teacher (same tokenizer as the student);
            needed to fit OPD, not to validate, test or predict. For OPSD leave it out to
            have the student's base weights teach (LoRA off, or a frozen copy).
        weighter: how much each rollout counts (`renio_pl.weighters`).
        loss: the per-token objective (`renio_pl.losses`).
        dtype: dtype both models are loaded in.
        student_lora: train a LoRA adapter instead of the full student.
        optimizer: optimizer over the student's trainable parameters.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        chunk_tokens: generated positions turned into full-vocabulary logits at once.
        gradient_checkpointing: recompute each student decoder layer's activations in the
            backward instead of keeping them (long completions or large micro-batches).
        evaluate_before_fit: log held-out accuracy at step 0, before the first update.
        pass_at_k: the k of each pass@k reported next to Avg@k and maj@k (those above the
            samples per problem are left out).
        diagnostics: per round, when the rollouts carry verifier labels: AUROC and mean weight
            of correct vs incorrect rollouts for the active and other weighters, lengths and
            epistemic markers (`renio_pl.diagnostics`); never used for training. None: off.
        teacher_server: take the teacher's log-probs from a running vLLM server instead of
            `teacher` (`renio_pl.teacher_server.ServerTeacher`); the loss must read no more
            than the teacher's top-k (`SampledReverseKL`, `TopKForwardKL`).
    """

    def __init__(
        self,
        student: InputPath,
        teacher: InputPath | None = None,
        weighter: Weighter = lazy_instance(UniformWeighter),
        loss: Loss = lazy_instance(ForwardKL),
        dtype: DType = "float32",
        student_lora: LoRA | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int = 4096,
        gradient_checkpointing: bool = False,
        evaluate_before_fit: bool = True,
        pass_at_k: list[int] = [4],
        diagnostics: Diagnostics | None = lazy_instance(Diagnostics),
        teacher_server: ServerTeacher | None = None,
    ) -> None:
        super().__init__(
            student, dtype=dtype, student_lora=student_lora, optimizer=optimizer, lr_scheduler=lr_scheduler,
            chunk_tokens=chunk_tokens, gradient_checkpointing=gradient_checkpointing,
            evaluate_before_fit=evaluate_before_fit, pass_at_k=pass_at_k,
        )
        self.save_hyperparameters(
            ignore=components_outside_cli("weighter", "loss", "optimizer", "lr_scheduler", "diagnostics", "teacher_server")
        )
        self.teacher_server = teacher_server
        if teacher_server is not None:
            _check_server_teacher(teacher, loss, teacher_server)
        self.weighter = weighter
        self.loss = loss
        self.diagnostics = diagnostics
        self._frozen: list[torch.nn.Module] = []  # a list, so the teacher is not a registered child
        if teacher is not None:
            teacher_model = load_model(teacher, dtype, option="model.teacher")
            check_same_vocabulary(
                self.student, teacher_model, load_tokenizer(student), load_tokenizer(teacher, option="model.teacher")
            )
            self._frozen.append(teacher_model.requires_grad_(False).eval())

    @property
    def separate_teacher(self) -> bool:
        """True when `model.teacher` is a model of its own (OPD); False when the student's base weights teach (OPSD)."""
        return self.hparams.teacher is not None

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher (eval mode, no gradients, not in the state dict)."""
        return self._frozen[0]

    def on_fit_start(self) -> None:
        check_fit_setup(self.trainer, self)  # fp32 master weights, one rollout round per epoch
        data = evaluation_data(self.trainer)
        self_distillation = data is not None and data.solution_field is not None
        if self.teacher_server is not None:
            vocabulary = self.student.get_output_embeddings().weight.shape[0]
            self.teacher_server.connect(load_tokenizer(self.hparams.student), vocabulary)
            return
        if not self._frozen and not self_distillation:
            raise ConfigError(
                "fit needs a teacher: set model.teacher to a hub id or a local model folder, or set "
                "data.solution_field for OPSD (the student's base weights then teach)"
            )
        if not self._frozen and self.hparams.student_lora and hasattr(self.student.get_output_embeddings(), "lora_A"):
            raise ConfigError(
                "model.student_lora adapts the output head, which the OPSD teacher (the student with its adapter "
                "off) shares outside the adapter switch; drop lm_head from target_modules or set model.teacher"
            )
        if not self._frozen and not self.hparams.student_lora:  # OPSD of a full student: its initial weights
            self._frozen.append(load_model(self.hparams.student, self.hparams.dtype).requires_grad_(False).eval())
        if self._frozen:
            self.teacher.to(self.device).eval()

    @contextmanager
    def teaching(self) -> Iterator[torch.nn.Module]:
        """The teacher to score with: the frozen one, or the LoRA student with its adapter off (OPSD)."""
        if self._frozen:
            yield self.teacher
            return
        was_training = self.student.training
        with self.student.disable_adapter():
            try:
                yield self.student.eval()
            finally:
                self.student.train(was_training)

    # --- the data flow -----------------------------------------------------------------------
    def score(self, batch: RolloutBatch) -> TokenScores:
        """Log-probs, entropy and token losses of the batch's completion tokens (B, T)."""
        student_hidden = completion_hidden_states(
            self.student, batch.input_ids, batch.attention_mask, batch.prompt_length
        )  # (B, T, H_S)
        if self.teacher_server is not None:
            teacher_top_k = self._server_scores(batch)
            return score_tokens_top_k(
                student_hidden, self.student.get_output_embeddings(), teacher_top_k, batch.completion_ids,
                batch.completion_mask, batch.temperature, self.loss, self.chunk_tokens,
            )
        with torch.no_grad(), self.teaching() as teacher:
            teacher_hidden = completion_hidden_states(teacher, *batch.teacher_inputs())  # (B, T, H_T)
            teacher_head = teacher.get_output_embeddings()  # not adapted: LoRA's all-linear skips the head
        return score_tokens(
            student_hidden,
            self.student.get_output_embeddings(),
            teacher_hidden,
            teacher_head,
            batch.completion_ids,
            batch.completion_mask,
            batch.temperature,
            self.loss,
            self.chunk_tokens,
        )

    def _server_scores(self, batch: RolloutBatch):
        """The server teacher's `TeacherTopK` of the batch; rollouts it left out (too long) lose their mask in place."""
        try:
            teacher_top_k, scored = self.teacher_server.score(*batch.teacher_inputs(), batch.completion_mask, batch.temperature)
        except TeacherServerDown as error:
            self._diverged(str(error), fix="restart the teacher server")
        batch.completion_mask &= scored.to(batch.completion_mask.device)[:, None]
        if self._trainer is not None and self.training:
            self.log("teacher/skipped_rollouts", float((~scored).sum()), reduce_fx="sum", batch_size=len(scored))
        return teacher_top_k

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor | None:
        """The batch loss; None (no backward, no optimizer step) when every process weighted all rollouts 0."""
        scores = self.score(batch)
        inputs = WeighterInputs(
            scores.student_logprobs, scores.teacher_logprobs, batch.completion_mask, scores.student_entropy, batch.correct
        )
        weights = self.weighter(inputs)  # (B,)
        self.last_weights = weights.detach()  # (B,) read by monitoring.TrainingMonitor's completions table
        global_tokens, processes = self._micro_step_tokens(batch) if self.loss.reduction == "token" else (None, 1)
        loss = weighted_loss(scores.token_loss, batch.completion_mask, weights, self.loss.reduction, global_tokens, processes)
        if self.diagnostics is not None:
            per_rollout = rollout_losses(scores.token_loss.detach(), batch.completion_mask)  # (B,)
            self.diagnostics.update_shape(weights, per_rollout, batch.groups, batch.correct)
        # One collective for both decisions: processes with a non-finite loss, processes with a kept rollout.
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), (weights.sum() > 0).float()])
        non_finite, kept = self.trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        if non_finite:  # stop every process before the update
            self._diverged(f"the training loss is not finite (here {loss.item()})")
        skipped = kept == 0
        self._log_training(batch, inputs, weights, loss, skipped)
        return None if skipped else loss

    def _micro_step_tokens(self, batch: RolloutBatch) -> tuple[Tensor, int]:
        """The `token` reduction's count: generated tokens of this micro-batch summed over every process
        (one all_reduce; each trains its `i`-th micro-batch of a step together), and the process count."""
        local = batch.completion_mask.sum()  # () int64
        return self.trainer.strategy.reduce(local, reduce_op="sum"), self.trainer.world_size

    def on_before_optimizer_step(self, optimizer) -> None:
        """Logs the gradient's global L2 norm (`train/grad_norm`, and its round mean in the diagnostics)."""
        if self.diagnostics is None:
            return
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
            self.diagnostics.update_grad_norm(norm)
            self.log("train/grad_norm", norm.detach(), batch_size=1)

    def _log_training(
        self, batch: RolloutBatch, inputs: WeighterInputs, weights: Tensor, loss: Tensor, skipped: bool
    ) -> None:
        mask = batch.completion_mask
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "train/loss": loss.detach(),
            "train/kl": inputs.log_ratio().nan_to_num(posinf=0.0, neginf=0.0).sum() / tokens,
            "rollout/len_mean": mask.sum(dim=1).float().mean(),
            "weights/kept_share": (weights > 0).float().mean(),
            "train/skipped_step": float(skipped),  # 1: every rollout weighted 0, no update
        }
        metrics.update({f"weights/{k}": v for k, v in self.weighter.statistics(inputs, weights).items()})
        if batch.correct is not None:
            metrics["rollout/accuracy"] = batch.correct.mean()
        self.log_dict(metrics, batch_size=mask.shape[0], prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=mask.shape[0])
        if self.diagnostics is not None and batch.correct is not None:
            self.diagnostics.update(inputs, weights, self.weighter, batch.texts)

    def on_train_epoch_start(self) -> None:
        if self.diagnostics is not None:
            self.diagnostics.reset()  # a round's diagnostics cover that round only

    def on_train_epoch_end(self) -> None:
        """Logs the round's diagnostics (nothing when its rollouts had no labels)."""
        if self.diagnostics is not None:
            self.log_dict(self.diagnostics.compute(), sync_dist=True)  # equal on every rank already

def _check_server_teacher(teacher: str | None, loss: Loss, teacher_server: ServerTeacher) -> None:
    """One line against a server teacher beside `model.teacher`, or under a loss that needs more than its top-k."""
    if teacher is not None:
        raise ConfigError("set model.teacher or model.teacher_server, not both")
    if loss.teacher_needs == "vocabulary":
        raise ConfigError(
            f"model.loss {type(loss).__name__} needs the teacher's full vocabulary, which model.teacher_server does not "
            "give; use renio_pl.losses.TopKForwardKL or SampledReverseKL, or an in-process model.teacher"
        )
    if loss.teacher_needs == "top_k" and teacher_server.top_k < loss.top_k:
        raise ConfigError(
            f"model.loss reads the teacher's top {loss.top_k} tokens but model.teacher_server.top_k is "
            f"{teacher_server.top_k}; set it to at least {loss.top_k}"
        )

"""The release's side of the parity check: its own `OPSDTrainer.compute_loss` on the fixed rollouts.

Run with the release's Python (its pinned stack), never with renio_pl's:

    python release_side.py RELEASE_DIR FIXTURE_DIR OUT.pt

`opsd_trainer` is imported from RELEASE_DIR unchanged (nothing stubbed). The trainer object is
made with `object.__new__` and given the attributes its `__init__` sets from the flags the
`run_*.sh` scripts pass (that `__init__` would also build a TRL `SFTTrainer`, a data set and an
optimizer, none of which the loss reads). `compute_loss` then runs as released; its
`_compute_jsd_from_log_probs` and `_compute_sample_weights` are wrapped only to record what they
return (per-token losses, ReNIO weights). The batch is laid out as `training_step` lays out its
rollouts: student ids with attention mask, teacher ids `[teacher prompt][completion]` with mask
`ids != pad`, labels = ids with prompt and pad positions set to -100.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from fixture import CASES, LORA, PAD_ID, TEMPERATURE, TOKEN_CLIP, Fixture, completion_mask, layout, select  # noqa: E402


def trainer_for(opsd_trainer, model, teacher, case) -> object:
    """An `OPSDTrainer` with the attributes `__init__` gives it for these flags (see the module docstring)."""
    from accelerate import Accelerator

    trainer = object.__new__(opsd_trainer.OPSDTrainer)
    trainer.accelerator = Accelerator(cpu=True)
    trainer.model = model
    trainer.student_vocab_size = model.config.vocab_size
    trainer.temperature = TEMPERATURE  # --temperature 1.1
    trainer.beta = 0.0  # BETA=0: forward KL(teacher || student)
    trainer.jsd_token_clip = TOKEN_CLIP  # --jsd_token_clip 0.05
    trainer.top_k_loss = None
    trainer.use_thinking_machines_loss = False
    trainer.reason_first = False
    trainer.use_ema_teacher = False
    trainer._ema_params = None
    trainer.use_renio = True
    trainer.imp_token_threshold = case.release["imp_token_threshold"]
    trainer.kd_clamp = case.release["kd_clamp"]
    trainer.weight_norm_type = case.release["weight_norm_type"]
    trainer.kd_sgo_tem = case.release["kd_sgo_tem"]
    trainer._global_weight_mean = 1.0
    trainer._global_weight_count = 0
    trainer.teacher_model = teacher
    trainer.use_separate_teacher = teacher is not None
    trainer.fixed_teacher = teacher is None  # OPSD: --fixed_teacher (base model, adapter off)
    if teacher is not None:  # as __init__ does with a separate teacher
        teacher.eval()
        teacher.requires_grad_(False)
    return trainer


def record(trainer, name: str, store: dict) -> None:
    """Wrap a bound method of `trainer` so its return value is kept in `store[name]`."""
    original = getattr(trainer, name)

    def wrapped(*args, **kwargs):
        store[name] = original(*args, **kwargs)
        return store[name]

    setattr(trainer, name, wrapped)


def batch_inputs(rollouts, prompt_side: str) -> dict:
    """The `inputs` dict `compute_loss` reads, as `training_step` builds it."""
    student_ids, student_mask, student_width = layout(rollouts.student_prompts, rollouts.completions, prompt_side)
    teacher_ids, _, teacher_width = layout(rollouts.teacher_prompts, rollouts.completions, prompt_side)
    labels = student_ids.clone()
    labels[:, :student_width] = -100
    labels[labels == PAD_ID] = -100
    return {
        "student_input_ids": student_ids,
        "student_attention_mask": student_mask,
        "teacher_input_ids": teacher_ids,
        "teacher_attention_mask": (teacher_ids != PAD_ID).long(),  # training_step: ones, 0 where ids == pad
        "student_prompt_length": student_width,
        "teacher_prompt_length": teacher_width,
        "labels": labels,
    }


def load_models(folder: Path, mode: str, fixture: Fixture):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(folder / "student", dtype=torch.float32)
    if mode == "opd":
        teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher", dtype=torch.float32)
        return student.train(), teacher
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"])
    student = get_peft_model(student, config)
    named = dict(student.named_parameters())
    missing = set(fixture.lora_weights) ^ {n for n, p in named.items() if p.requires_grad}
    if missing:
        raise SystemExit(f"LoRA parameter names differ between the fixture and this peft: {sorted(missing)[:4]}")
    with torch.no_grad():
        for name, value in fixture.lora_weights.items():
            named[name].copy_(value)
    return student.train(), None


def main(release_dir: str, fixture_dir: str, out: str) -> None:
    sys.path.insert(0, release_dir)
    import opsd_trainer  # the release's module, as released

    torch.use_deterministic_algorithms(True)
    folder = Path(fixture_dir)
    fixture = Fixture.load(folder)
    results = []
    for case in CASES:
        student, teacher = load_models(folder, case.mode, fixture)
        trainer = trainer_for(opsd_trainer, student, teacher, case)
        store: dict = {}
        record(trainer, "_compute_jsd_from_log_probs", store)
        record(trainer, "_compute_sample_weights", store)
        steps = []
        for rows in case.steps:
            rollouts = select(fixture.rollouts[case.mode], rows)
            student.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(student, batch_inputs(rollouts, "right" if case.layout == "release" else "left"))
            loss.backward()
            mask = completion_mask(rollouts.completions)
            steps.append({
                "weights": store["_compute_sample_weights"].detach().float(),
                "token_loss": torch.where(mask, store["_compute_jsd_from_log_probs"].detach().float(), 0.0),
                "loss": loss.detach(),
                "grads": {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.requires_grad},
            })
        results.append({"case": case.name, "steps": steps})
    import accelerate
    import peft
    import transformers
    import trl

    versions = {m.__name__: str(m.__version__) for m in (torch, transformers, trl, peft, accelerate)}
    versions["python"] = sys.version.split()[0]
    torch.save({"versions": versions, "cases": results}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])

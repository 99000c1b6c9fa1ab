"""renio_pl's side of the parity check: the training path of `DistillationModule` on the fixed rollouts.

Run with a Python that imports renio_pl:

    python ours_side.py FIXTURE_DIR OUT.pt

Per step, exactly what `DistillationModule.training_step` computes before its cross-process
checks: `collate_rollouts` lays the rollouts out, `module.score` scores them (OPD: the frozen
teacher; OPSD: the LoRA student with its adapter off), the `ReNIOWeighter` weights them and
`weighted_loss` reduces with the loss's reduction (`sample`); `backward` gives the student's gradients. The loss is
`ForwardKL(clamp=0.05)` at the rollouts' temperature 1.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from fixture import CASES, LORA, PAD_ID, TEMPERATURE, TOKEN_CLIP, Fixture, select  # noqa: E402


def module_for(folder: Path, case, fixture: Fixture):
    from renio_pl.losses import ForwardKL
    from renio_pl.models import LoRA
    from renio_pl.module import DistillationModule
    from renio_pl.weighters import ReNIOWeighter

    weighter = ReNIOWeighter(**case.ours)
    loss = ForwardKL(clamp=TOKEN_CLIP, reduction="sample")  # per-sample token mean, then the weighted batch mean
    if case.mode == "opd":
        return DistillationModule(str(folder / "student"), str(folder / "teacher"), weighter, loss, diagnostics=None).train()
    lora = LoRA(r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["target_modules"])
    module = DistillationModule(str(folder / "student"), None, weighter, loss, student_lora=lora, diagnostics=None)
    named = dict(module.student.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    if trainable != set(fixture.lora_weights):
        differ = sorted(trainable ^ set(fixture.lora_weights))
        raise SystemExit(f"LoRA parameter names differ from the fixture's: {differ[:4]}")
    with torch.no_grad():
        for name, value in fixture.lora_weights.items():
            named[name].copy_(value)
    return module.train()


def rollout_batch(rollouts):
    from renio_pl.rollouts import Rollout, collate_rollouts

    items = [
        Rollout(prompt_ids=p, completion_ids=c, prompt_index=i, temperature=TEMPERATURE, teacher_prompt_ids=t)
        for i, (p, t, c) in enumerate(zip(rollouts.student_prompts, rollouts.teacher_prompts, rollouts.completions))
    ]
    return collate_rollouts(items, PAD_ID)


def step(module, rollouts) -> dict:
    from renio_pl.losses import weighted_loss
    from renio_pl.weighters import WeighterInputs

    batch = rollout_batch(rollouts)
    module.student.zero_grad(set_to_none=True)
    scores = module.score(batch)
    inputs = WeighterInputs(scores.student_logprobs, scores.teacher_logprobs, batch.completion_mask, scores.student_entropy)
    weights = module.weighter(inputs)
    loss = weighted_loss(scores.token_loss, batch.completion_mask, weights, module.loss.reduction)
    loss.backward()
    return {
        "weights": weights.detach(),
        "token_loss": torch.where(batch.completion_mask, scores.token_loss.detach(), 0.0),
        "loss": loss.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in module.student.named_parameters() if p.requires_grad},
    }


def renio_pl_commit(root: Path) -> str:
    """The commit of the renio_pl checkout that ran, marked `+changes` when its package files differ from it."""
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "renio_pl"], capture_output=True, text=True)
    commit = head.stdout.strip() or "unknown"
    return commit + (" +changes" if dirty.stdout.strip() else "")


def main(fixture_dir: str, out: str) -> None:
    torch.use_deterministic_algorithms(True)
    folder = Path(fixture_dir)
    fixture = Fixture.load(folder)
    results = []
    for case in CASES:
        try:
            module = module_for(folder, case, fixture)
        except TypeError as error:  # an option this renio_pl does not have
            results.append({"case": case.name, "error": f"this renio_pl lacks an option of the case ({error})"})
            continue
        steps = [step(module, select(fixture.rollouts[case.mode], rows)) for rows in case.steps]
        results.append({"case": case.name, "steps": steps})
    import peft
    import transformers

    import renio_pl

    versions = {m.__name__: str(m.__version__) for m in (torch, transformers, peft)}
    versions["python"] = sys.version.split()[0]
    versions["renio_pl"] = renio_pl_commit(Path(renio_pl.__file__).resolve().parents[1])
    torch.save({"versions": versions, "cases": results}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Parity of renio_pl's OPD/OPSD loss path with the ReNIO authors' release, on the same fixed rollouts.

    python evaluation/release_parity/run.py --release-dir /path/to/ReNIO --release-python /path/to/venv/bin/python

(or set RENIO_PL_RELEASE_DIR and RENIO_PL_RELEASE_PYTHON). Builds a tiny random-weight Qwen3
student and teacher and a LoRA adapter, samples fixed rollouts from them, then runs
`release_side.py` under the release's Python (its own `OPSDTrainer.compute_loss`) and
`ours_side.py` under renio_pl's (`--ours-python`, default this Python) on every case of
`fixture.CASES`, and compares per step: ReNIO weights, per-token losses (on the generated
tokens), batch loss and student gradients, in float32 on CPU, to `--tolerance` (1e-5).
Writes a markdown report (`--report`) and the raw figures (`--json`); exits 1 when a case
expected to match does not, or a case expected to differ does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from fixture import CASES, EOS_ID, LORA, PAD_ID, TEMPERATURE, Fixture, Rollouts  # noqa: E402

from renio_pl.demo.task import make_tokenizer  # noqa: E402

VOCAB = 64
HEAD_SCALE = 5.0  # lm_head weights x5: sampled tokens' log-ratios spread over about [-2, 3], across ReNIO's thresholds
LORA_STD = 0.15  # random LoRA A and B, so the OPSD student differs from its base weights
QUANTITIES = ("weights", "token_loss", "loss", "grads")
METHOD = """## How the check runs

- Models: a 2-layer random-weight Qwen3 student and teacher (vocabulary 64, lm_head weights x5 so that the
  sampled tokens' log-ratios cross ReNIO's thresholds), written with `save_pretrained` and loaded by both
  stacks. OPSD: the student carries a random LoRA adapter (r 4, alpha 8, all projections), its base weights
  (adapter off) teach, as the release's `--fixed_teacher` does.
- Rollouts: 9 (OPD) and 6 (OPSD) completions of 9-16 tokens sampled at temperature 1.1 from the student
  (OPD rows 6-8 from the teacher), prompts of 3-8 tokens; the teacher reads `[solution][prompt]` (OPD) or
  `[prompt][solution]` (OPSD), so its prompt width differs from the student's and the completion tokens
  must be aligned after each.
- The release's side (`release_side.py`, its venv): `opsd_trainer.py` imported unchanged, nothing stubbed.
  The `OPSDTrainer` is made with `object.__new__` and given the attributes its `__init__` sets from the
  scripts' flags (temperature 1.1, beta 0, jsd_token_clip 0.05, use_renio, threshold, kd_clamp, kd_sgo_tem,
  weight_norm_type, the teacher mode, an `accelerate.Accelerator(cpu=True)`); `__init__` itself would build
  a TRL `SFTTrainer` with a data set and an optimizer that the loss never reads. Its `compute_loss` runs as
  released and `backward` gives the gradients; `_compute_jsd_from_log_probs` and `_compute_sample_weights`
  are wrapped only to record what they return. The batch is the dict `training_step` builds (ids, masks,
  the teacher's mask `ids != pad`, labels with prompt and pad set to -100). In the `left` layout both sides
  get left-padded prompts: with no position ids passed, the release's model numbers positions from the
  first pad, a shift common to the whole row that rotary attention cancels.
- renio_pl's side (`ours_side.py`): `DistillationModule` with `ForwardKL(clamp=0.05, reduction="sample")` and
  the case's `ReNIOWeighter`; per step `collate_rollouts`, `module.score`, the weighter, `weighted_loss`
  with the loss's reduction, `backward` - what `training_step` does before its cross-process checks.
- A case with several steps runs them in order on one trainer / one module (the `ema` running mean carries
  over), gradients zeroed before each.

## Not covered here

- The batch the release's vLLM path builds: student prompts decoded with special tokens skipped and
  re-tokenised, while `training_step` still cuts the sequences at the collator's prompt width, which counts
  the removed special tokens; by our reading (not run here) the first few completion tokens of every row
  then leave the loss and the teacher's input. That happens before `compute_loss` and is not compared.
- bf16, FlashAttention-2, DeepSpeed ZeRO-2 and several GPUs (the paper's runs); here float32, SDPA, one CPU
  process.
- A row with no generated token: the release gives it raw weight 1 and counts it in the batch mean,
  renio_pl gives it 0 and leaves it out. A sampler returns at least one token, so no case has one.
- The release's stack: its `environment.yml` pins Python 3.10 and torch 2.8.0; this run used Python 3.11
  and torch 2.13.0 (CPU wheels) with its other pins (transformers 4.57.1, trl 0.26.0, peft 0.17.1,
  accelerate 1.11.0, datasets 3.6.0, safetensors 0.5.3); deepspeed, vllm, xformers, bitsandbytes,
  flash-attn and wandb are not installed (the trainer imports them only when available or when used).
"""


def tiny_model(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=PAD_ID,
        eos_token_id=EOS_ID, bos_token_id=None, tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


def lora_student(student):
    """The student wrapped with `LORA`, A and B drawn at random (seeded)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"])
    model = get_peft_model(student, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * LORA_STD)
    return model.eval()


@torch.no_grad()
def sample(model, prompt: list[int], length: int, generator: torch.Generator) -> list[int]:
    """`length` tokens drawn at `TEMPERATURE`, never the pad id (the release masks pad-id labels)."""
    ids = list(prompt)
    for _ in range(length):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1] / TEMPERATURE
        logits[PAD_ID] = -float("inf")
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return ids[len(prompt):]


def build_fixture(folder: Path) -> Fixture:
    """Models in `folder/student`, `folder/teacher`; rollouts and LoRA weights in the returned `Fixture`."""
    student, teacher = tiny_model(0), tiny_model(1)
    tokenizer = make_tokenizer()  # <pad> 0, <eos> 1 as the models have; the rollouts are token ids, never text
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    generator = torch.Generator().manual_seed(11)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=generator).tolist()

    prompt_lengths, completion_lengths = [3, 5, 7, 4, 6, 8, 5, 3, 6], [16, 12, 9, 16, 14, 11, 15, 10, 13]
    prompts = [tokens(n) for n in prompt_lengths]
    solutions = [tokens(n) for n in (4, 6, 5, 7, 3, 6, 4, 5, 6)]
    fixture = Fixture()
    # OPD: rows 0-5 sampled from the student, 6-8 from the teacher; the teacher reads its own prompt.
    opd_models = [student] * 6 + [teacher] * 3
    fixture.rollouts["opd"] = Rollouts(
        prompts, [s + p for s, p in zip(solutions, prompts)],
        [sample(m, p, n, generator) for m, p, n in zip(opd_models, prompts, completion_lengths)],
    )
    # OPSD: the LoRA student samples; its base weights teach after [solution][prompt].
    adapted = lora_student(tiny_model(0))
    fixture.rollouts["opsd"] = Rollouts(
        prompts[:6], [p + s for p, s in zip(prompts[:6], solutions[:6])],
        [sample(adapted, p, n, generator) for p, n in zip(prompts[:6], completion_lengths[:6])],
    )
    fixture.lora_weights = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    fixture.save(folder)
    return fixture


def max_abs_diff(ours, theirs) -> float:
    """Largest |ours - theirs| over a tensor, or over every tensor of a name -> tensor dict (same names)."""
    if isinstance(ours, dict):
        if set(ours) != set(theirs):
            raise ValueError(f"gradient names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
        return max(max_abs_diff(ours[n], theirs[n]) for n in ours)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    return (ours.double() - theirs.double()).abs().max().item()


def largest(value) -> float:
    return max(largest(v) for v in value.values()) if isinstance(value, dict) else value.abs().max().item()


def compare(ours: list[dict], theirs: list[dict], tolerance: float, cases=CASES) -> list[dict]:
    """Per case: max abs difference of each quantity over its steps, and a verdict against `Case.expect`."""
    rows = []
    for case, mine, release in zip(cases, ours, theirs, strict=True):
        row = {"case": case.name, "mode": case.mode, "expect": case.expect, "why": case.why,
               "right": case.right, "release_flags": case.release, "ours_weighter": case.ours, "steps": len(case.steps)}
        if "error" in mine or "error" in release:
            row.update(verdict="not run", error=mine.get("error") or release.get("error"))
            rows.append(row)
            continue
        row["diff"] = {q: max(max_abs_diff(a[q], b[q]) for a, b in zip(mine["steps"], release["steps"])) for q in QUANTITIES}
        row["scale"] = {q: max(largest(b[q]) for b in release["steps"]) for q in QUANTITIES}
        row["weights"] = {"ours": [s["weights"].tolist() for s in mine["steps"]],
                          "release": [s["weights"].tolist() for s in release["steps"]]}
        row["rows_with_token_loss_diff"] = [
            [i for i in range(len(a["token_loss"])) if max_abs_diff(a["token_loss"][i], b["token_loss"][i]) > tolerance]
            for a, b in zip(mine["steps"], release["steps"])
        ]
        within = all(d <= tolerance for d in row["diff"].values())
        if case.expect == "equal":
            row["verdict"] = "match" if within else "MISMATCH"
        else:
            row["verdict"] = "differs, as expected" if not within else "EXPECTED DIFFERENCE NOT EXERCISED"
        rows.append(row)
    return rows


def run_side(python: str, script: str, *args: str) -> dict:
    done = subprocess.run([python, str(HERE / script), *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    if done.returncode != 0:
        raise SystemExit(f"{script} under {python} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return torch.load(args[-1])


def git_commit(folder: Path) -> str:
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


def versions(stack: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in stack.items() if name != "renio_pl")


def fmt(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def markdown(rows: list[dict], meta: dict, tolerance: float) -> str:
    lines = [
        "# Parity with the ReNIO release's loss code",
        "",
        f"- release: `{meta['release_dir']}` at commit `{meta['release_commit']}`",
        f"- release stack: {versions(meta['release_versions'])}",
        f"- renio_pl at commit `{meta['ours_versions']['renio_pl']}`: {versions(meta['ours_versions'])}; "
        f"this script at commit `{meta['script_commit']}`",
        f"- command: `{meta['command']}`",
        f"- float32, CPU; tolerance {tolerance:g} on the max abs difference; temperature {TEMPERATURE}, "
        "forward KL with the per-entry clamp 0.05 (`--beta 0 --jsd_token_clip 0.05`)",
        "",
        "Max abs difference over every step of a case (`token_loss` on generated tokens; `grads` over every "
        "trainable student tensor); in brackets the largest magnitude of that quantity on the release's side.",
        "",
        "| case | expect | verdict | weights | per-token loss | batch loss | student grads |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "diff" not in row:
            lines.append(f"| {row['case']} | {row['expect']} | {row['verdict']}: {row['error']} | | | | |")
            continue
        cells = [f"{fmt(row['diff'][q])} ({fmt(row['scale'][q])})" for q in QUANTITIES]
        lines.append(f"| {row['case']} | {row['expect']} | {row['verdict']} | " + " | ".join(cells) + " |")
    lines += ["", "## ReNIO weights per step (renio_pl / release)", ""]
    for row in rows:
        if "weights" in row:
            for i, (mine, theirs) in enumerate(zip(row["weights"]["ours"], row["weights"]["release"])):
                mine, theirs = [round(w, 4) for w in mine], [round(w, 4) for w in theirs]
                lines.append(f"- {row['case']}, step {i + 1}: `{mine}` / `{theirs}`")
    lines += ["", "## Known differences exercised", ""]
    for row in rows:
        if row["expect"] == "differ":
            rows_note = ""
            if "rows_with_token_loss_diff" in row:
                rows_note = f" Rows whose per-token losses differ, per step: {row['rows_with_token_loss_diff']}."
            lines.append(f"- **{row['case']}**: {row['why']}.{rows_note} Which is right: {row['right']}.")
    return "\n".join(lines) + "\n\n" + METHOD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release-dir", default=os.environ.get("RENIO_PL_RELEASE_DIR"),
                        help="checkout of github.com/BDML-lab/ReNIO (env RENIO_PL_RELEASE_DIR)")
    parser.add_argument("--release-python", default=os.environ.get("RENIO_PL_RELEASE_PYTHON"),
                        help="Python of a venv with the release's pinned stack (env RENIO_PL_RELEASE_PYTHON)")
    parser.add_argument("--ours-python", default=sys.executable, help="Python that imports renio_pl (default: this one)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--report", type=Path, help="markdown report to write")
    parser.add_argument("--json", type=Path, help="raw figures to write")
    args = parser.parse_args(argv)
    if not args.release_dir or not (Path(args.release_dir) / "opsd_trainer.py").is_file():
        parser.error("--release-dir (or RENIO_PL_RELEASE_DIR) must be a checkout of the ReNIO release with opsd_trainer.py")
    if not args.release_python:
        parser.error("--release-python (or RENIO_PL_RELEASE_PYTHON) must name the Python of the release's venv")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_fixture(folder)
        ours = run_side(args.ours_python, "ours_side.py", str(folder), str(folder / "ours.pt"))
        release_dir = str(Path(args.release_dir).resolve())
        theirs = run_side(args.release_python, "release_side.py", release_dir, str(folder), str(folder / "release.pt"))
    rows = compare(ours["cases"], theirs["cases"], args.tolerance)
    meta = {
        "release_dir": "$RENIO_PL_RELEASE_DIR", "release_commit": git_commit(Path(args.release_dir)),
        "release_versions": theirs["versions"], "script_commit": git_commit(HERE), "ours_versions": ours["versions"],
        "command": "python evaluation/release_parity/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "tolerance": args.tolerance, "cases": rows}, indent=1))
    text = markdown(rows, meta, args.tolerance)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0 if all(r["verdict"] in ("match", "differs, as expected") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

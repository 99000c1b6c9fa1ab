"""What both sides of the release parity check read: the cases, the rollouts, the batch layouts.

Plain torch and the standard library only: this module is imported by `ours_side.py` (renio_pl's
venv) and by `release_side.py` (the ReNIO release's venv), so both lay out the same token ids
the same way. The models themselves are folders written by `run.py` (`save_pretrained`).

Glossary: `B` rollouts in a step, `P` padded prompt width, `T` padded completion width.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PAD_ID = 0  # the tiny models' pad token; sampled completions never contain it (the release masks labels == pad)
EOS_ID = 1
TEMPERATURE = 1.1  # --temperature 1.1 in every run_*.sh of the release
TOKEN_CLIP = 0.05  # --jsd_token_clip 0.05 (run_opd_1b.sh, run_opsd_1b.sh, run_opsd_4b.sh)
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@dataclass
class Case:
    """One comparison: a mode, the release's ReNIO flags, and the renio_pl weighter that should match them.

    Attributes:
        name: label in the report.
        mode: `opd` (separate teacher model, full student) or `opsd` (LoRA student; the teacher
            is its base weights, adapter off, reading a privileged prompt).
        steps: row indices of the mode's rollouts making each successive micro-batch (more than
            one step only matters for `ema`, whose running mean carries over).
        release: the release's flags (`imp_token_threshold`, `kd_clamp`, `kd_sgo_tem`,
            `weight_norm_type`).
        ours: keyword arguments of `renio_pl.weighters.ReNIOWeighter`.
        expect: `equal` (parity to the tolerance) or `differ` (a known difference, explained in `why`).
        why: for `differ`, the reason.
        right: for `differ`, which side is right and when it matters.
        layout: `left` (prompts left-padded, as renio_pl lays them out) for both sides, or
            `release` (the release's side gets its collator's right-padded prompts).
    """

    name: str
    mode: str
    steps: list[list[int]]
    release: dict
    ours: dict
    expect: str = "equal"
    why: str = ""
    right: str = ""
    layout: str = "left"


def release_flags(threshold: float, clip: float, normalization: str = "batch_mean", temperature: float = 1.0) -> dict:
    return {"imp_token_threshold": threshold, "kd_clamp": clip, "weight_norm_type": normalization, "kd_sgo_tem": temperature}


def ours_weighter(
    threshold: float, clip: float, normalization: str = "batch_mean", temperature: float = 1.0, **extra
) -> dict:
    return {"threshold": threshold, "clip": clip, "normalization": normalization, "temperature": temperature, **extra}


ALL_OPD, ALL_OPSD = [list(range(6))], [list(range(6))]
# ema: three micro-batches. Rows 8 and 7 (sampled from the teacher: no pivotal token at
# threshold 1.0, then one) keep the running mean low; rows 0-2 (sampled from the student) then
# have raw weights far above it, so a cap of 10 binds on one of them.
EMA_STEPS = [[8], [7], [0, 1, 2]]

CASES = [
    Case("OPD, release settings", "opd", ALL_OPD, release_flags(1.0, 2.0), ours_weighter(1.0, 2.0)),
    Case("OPSD, release settings", "opsd", ALL_OPSD, release_flags(0.8, 2.5), ours_weighter(0.8, 2.5)),
    Case(
        "OPSD, threshold 1.5 > clip 1.0, renio_pl's order", "opsd", ALL_OPSD, release_flags(1.5, 1.0),
        ours_weighter(1.5, 1.0), expect="differ",
        why="the release clips l_t to kd_clamp before the threshold test, so with threshold > clip no token "
        "is ever pivotal and every weight is exp(0) = 1 (ReNIO switched off); renio_pl tests the unclipped l_t",
        right="the two orders agree whenever threshold <= clip, which holds in every run_*.sh of the release "
        "((1.0, 2.0), (0.8, 2.5), (0.01, 2.0)), so the paper's runs are not affected; above that the release's "
        "order silently disables ReNIO, and renio_pl's (pivotal set from the unclipped l_t, then the clip on the "
        "values averaged) is the meaningful one. `clip_before_threshold: true` reproduces the release (next row)",
    ),
    Case(
        "OPSD, threshold 1.5 > clip 1.0, clip_before_threshold", "opsd", ALL_OPSD, release_flags(1.5, 1.0),
        ours_weighter(1.5, 1.0, clip_before_threshold=True),
    ),
    Case(
        "OPD, ema, 3 steps, renio_pl's cap 10", "opd", EMA_STEPS, release_flags(1.0, 2.0, "ema", 0.25),
        ours_weighter(1.0, 2.0, "ema", 0.25), expect="differ",
        why="the release's ema normalisation divides by the running mean with no cap; renio_pl caps at 10",
        right="every run_*.sh of the release uses batch_mean (capped at 10 there too), so the paper's runs are not "
        "affected. Uncapped, a rollout's weight is unbounded when the running mean lags a batch of high raw weights "
        "(12.04 here); the cap is renio_pl's guard, and `cap: null` reproduces the release (next row)",
    ),
    Case("OPD, ema, 3 steps, uncapped", "opd", EMA_STEPS, release_flags(1.0, 2.0, "ema", 0.25),
         ours_weighter(1.0, 2.0, "ema", 0.25, cap=None)),
    Case(
        "OPSD, release settings, the release's right-padded prompts", "opsd", ALL_OPSD, release_flags(0.8, 2.5),
        ours_weighter(0.8, 2.5), expect="differ", layout="release",
        why="the release's collator right-pads prompts to the batch's longest, so in a shorter prompt's row "
        "masked pad tokens sit between prompt and completion and, with no position_ids passed, shift the "
        "completion's rotary positions; renio_pl left-pads and numbers positions past the padding",
        right="renio_pl's: each completion is scored at the positions it was sampled at (the release's vLLM "
        "sampler reads every prompt unpadded; renio_pl's position ids skip the left padding, so a row scores as if "
        "alone). In the release's layout, every row whose prompt is shorter than its micro-batch's longest has its "
        "completion shifted by the gap, for the student and for the teacher (whose prompts are right-padded too), so "
        "its log-ratios and KL are not those of the policy that sampled it. This is built upstream of the loss code "
        "(the collator and `_generate_on_policy_outputs_vllm`); renio_pl does not offer that layout",
    ),
]


@dataclass
class Rollouts:
    """The fixed rollouts of one mode: token id lists, no padding."""

    student_prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    completions: list[list[int]]


@dataclass
class Fixture:
    """Everything `run.py` writes to the fixture folder besides the model folders."""

    rollouts: dict[str, Rollouts] = field(default_factory=dict)
    lora_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # peft parameter name -> tensor

    def save(self, folder: Path) -> None:
        (folder / "rollouts.json").write_text(json.dumps({m: asdict(r) for m, r in self.rollouts.items()}))
        torch.save(self.lora_weights, folder / "lora_weights.pt")

    @classmethod
    def load(cls, folder: Path) -> "Fixture":
        rollouts = {m: Rollouts(**r) for m, r in json.loads((folder / "rollouts.json").read_text()).items()}
        return cls(rollouts, torch.load(folder / "lora_weights.pt"))


def layout(
    prompts: list[list[int]], completions: list[list[int]], prompt_side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, P + T) ids and 0/1 attention mask, and `P`.

    Completions are right-padded to `T`. Prompts are padded to `P` on `prompt_side`: `left` is
    renio_pl's layout; `right` is the release's (its collator sets `padding_side = "right"`).
    """
    width = max(len(p) for p in prompts)
    completion_width = max(len(c) for c in completions)
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions):
        fill, tail = [PAD_ID] * (width - len(prompt)), [PAD_ID] * (completion_width - len(completion))
        if prompt_side == "left":
            rows.append(fill + prompt + completion + tail)
            masks.append([0] * len(fill) + [1] * (len(prompt) + len(completion)) + [0] * len(tail))
        else:
            rows.append(prompt + fill + completion + tail)
            masks.append([1] * len(prompt) + [0] * len(fill) + [1] * len(completion) + [0] * len(tail))
    return torch.tensor(rows), torch.tensor(masks), width


def completion_mask(completions: list[list[int]]) -> torch.Tensor:
    """(B, T) bool, True on generated tokens."""
    width = max(len(c) for c in completions)
    return torch.tensor([[t < len(c) for t in range(width)] for c in completions])


def select(rollouts: Rollouts, rows: list[int]) -> Rollouts:
    fields = ("student_prompts", "teacher_prompts", "completions")
    return Rollouts(*([getattr(rollouts, f)[i] for i in rows] for f in fields))


def save_results(results: list[dict], path: Path) -> None:
    """Per case, per step: `weights` (B,), `token_loss` (B, T) 0 off the mask, `loss` (), `grads` {name: tensor}."""
    torch.save(results, path)

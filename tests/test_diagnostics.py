"""Round diagnostics: exact AUROC and means worked by hand, marker counts, and no effect on training."""

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from renio_pl.datamodule import OnPolicyDataModule
from renio_pl.diagnostics import (
    ByCorrectness, Diagnostics, GroupAccuracy, count_markers, effective_sample_share, top_loss_share,
)
from renio_pl.errors import ConfigError
from renio_pl.module import DistillationModule
from renio_pl.rollouts import SamplingConfig
from renio_pl.weighters import LengthWeighter, ReNIOWeighter, WeighterInputs


def even_length(text: str, answer: str) -> bool:
    """A test verifier that labels a random student's rollouts both ways: correct iff the text has even length."""
    return len(text) % 2 == 0


def _values(metric: ByCorrectness) -> dict[str, float]:
    return {name: float(value) for name, value in metric.compute().items()}


def test_auroc_of_a_weight_for_an_incorrect_rollout_worked_by_hand():
    metric = ByCorrectness(auroc=True)
    # incorrect {3, 1}, correct {2, 0.5}; (incorrect, correct) pairs ranked right:
    # (3,2) yes, (3,0.5) yes, (1,2) no, (1,0.5) yes -> 3/4
    metric.update(torch.tensor([3.0, 1.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert _values(metric) == pytest.approx({"auroc_incorrect": 0.75, "correct": 1.25, "incorrect": 2.0}, abs=1e-12)


def test_auroc_counts_ties_as_half():
    metric = ByCorrectness(auroc=True)
    # incorrect {1, 0.5}, correct {1, 2}: (1,1) tie 0.5, (1,2) 0, (0.5,1) 0, (0.5,2) 0 -> 0.5 / 4
    metric.update(torch.tensor([1.0, 1.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert _values(metric)["auroc_incorrect"] == pytest.approx(0.125, abs=1e-12)
    uniform = ByCorrectness(auroc=True)
    uniform.update(torch.ones(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert _values(uniform)["auroc_incorrect"] == 0.5  # all tied


def test_auroc_is_over_the_whole_round_whatever_the_range_of_each_micro_batch():
    """torchmetrics takes values outside [0, 1] for logits; a per-batch sigmoid would turn 1.5 below 0.9."""
    metric = ByCorrectness(auroc=True)
    metric.update(torch.tensor([0.9, 0.2]), torch.tensor([0.0, 1.0]))  # within [0, 1]
    metric.update(torch.tensor([1.5, 0.1]), torch.tensor([1.0, 0.0]))  # outside
    # incorrect {0.9, 0.1}, correct {0.2, 1.5}: only (0.9, 0.2) ranked right -> 1/4 (a per-batch sigmoid gives 3/4)
    assert _values(metric)["auroc_incorrect"] == pytest.approx(0.25, abs=1e-12)


def test_auroc_ranks_large_weights_that_a_sigmoid_would_tie():
    """Unnormalised weights (`normalization: none`, a small temperature) reach exp(40): sigmoid(40) == sigmoid(50) == 1."""
    metric = ByCorrectness(auroc=True)
    metric.update(torch.tensor([50.0, 40.0]), torch.tensor([0.0, 1.0]))
    assert _values(metric)["auroc_incorrect"] == 1.0


def test_weighted_means_and_undefined_values_are_left_out():
    metric = ByCorrectness(overall=True)
    # correct: (0.5*4 + 0*2) / 6 = 1/3; incorrect: 1*1 / 1 = 1; all: 3 / 7
    metric.update(torch.tensor([0.5, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), weights=torch.tensor([4.0, 2.0, 1.0]))
    assert _values(metric) == pytest.approx({"correct": 1 / 3, "incorrect": 1.0, "all": 3 / 7}, abs=1e-12)
    only_incorrect = ByCorrectness(auroc=True)
    only_incorrect.update(torch.tensor([2.0, 1.0]), torch.zeros(2))
    assert _values(only_incorrect) == {"incorrect": 1.5}  # no correct rollout: no AUROC, no correct mean


def test_count_markers_case_insensitive_on_word_boundaries():
    texts = ["Wait, let me check. wait", "hmm hmmm", "awaiting verify-ing", "Let me\ncheck Hmm", "let me checking"]
    markers = ["wait", "let me check", "hmm", "alternatively", "verify"]
    expected = torch.tensor([
        [2, 1, 0, 0, 0],  # "Wait," and "wait"; "let me check."
        [0, 0, 1, 0, 0],  # "hmmm" is another word
        [0, 0, 0, 0, 1],  # "awaiting" is not "wait"; "verify-" ends at the hyphen
        [0, 1, 1, 0, 0],  # a newline inside the phrase
        [0, 0, 0, 0, 0],  # "checking" is not "check"
    ], dtype=torch.float32)
    torch.testing.assert_close(count_markers(texts, markers), expected, rtol=0, atol=0)
    assert count_markers([], markers).shape == (0, 5) and count_markers(texts, []).shape == (5, 0)


def _batch() -> tuple[WeighterInputs, list[str]]:
    """Four rollouts of 3, 1, 2, 2 tokens; log-ratio = student log-prob (teacher 0); rows 1, 2 correct."""
    ratio = torch.tensor([[1.0, 0.0, 0.9], [0.5, 0.0, 0.0], [0.85, 0.1, 0.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    inputs = WeighterInputs(ratio, torch.zeros(4, 3), mask, torch.ones(4, 3), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    texts = ["Wait, let me check. wait", "hmm", "awaiting verify-ing", "Let me\ncheck Hmm"]
    return inputs, texts


def test_diagnostics_of_one_round_worked_by_hand():
    inputs, texts = _batch()
    diagnostics = Diagnostics({"length": LengthWeighter(), "renio": ReNIOWeighter(threshold=0.8)})
    diagnostics.update(inputs, torch.tensor([3.0, 1.0, 2.0, 0.5]), ReNIOWeighter(threshold=0.8), texts)
    logged = diagnostics.compute()
    expected = {
        # active weights: incorrect {3, 0.5}, correct {1, 2}: (3,1) (3,2) right, (0.5,*) wrong -> 2/4
        "diag/active/auroc_incorrect": 0.5, "diag/active/weight_correct": 1.5, "diag/active/weight_incorrect": 1.75,
        # length weights = lengths / mean 2 = [1.5, 0.5, 1, 1]; incorrect {1.5, 1}, correct {0.5, 1} -> 3.5/4
        "diag/length/auroc_incorrect": 0.875, "diag/length/weight_correct": 0.75, "diag/length/weight_incorrect": 1.25,
        # pivotal (l >= 0.8) tokens per row: 2 of 3, 0 of 1, 1 of 2, 1 of 2
        "diag/renio/pivotal_share": 4 / 8, "diag/renio/pivotal_share_correct": 1 / 3,
        "diag/renio/pivotal_share_incorrect": 3 / 5,
        "diag/len_correct": 1.5, "diag/len_incorrect": 2.5,
        # markers per row (see the marker test): 3, 1, 1, 2
        "diag/markers_correct": 1.0, "diag/markers_incorrect": 2.5,
        "diag/marker/wait_correct": 0.0, "diag/marker/wait_incorrect": 1.0,
        "diag/marker/let_me_check_correct": 0.0, "diag/marker/let_me_check_incorrect": 1.0,
        "diag/marker/verify_correct": 0.5, "diag/marker/verify_incorrect": 0.0,
    }
    assert {k: logged[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert logged["diag/active/pivotal_share"] == logged["diag/renio/pivotal_share"]  # the same ReNIO settings
    # ReNIO weights (batch_mean): row 0's score is mean(1.0, 0.9), rows 1..3 score 0, 0.85, 2.0
    raw = torch.exp(torch.tensor([0.95, 0.0, 0.85, 2.0]))
    weights = raw / raw.mean()
    assert logged["diag/renio/weight_correct"] == pytest.approx(float(weights[[1, 2]].mean()), abs=1e-6)
    # incorrect {w0, w3} beat correct {w1, w2} in every pair
    assert logged["diag/renio/auroc_incorrect"] == 1.0
    diagnostics.reset()
    assert diagnostics.compute() == {}


def test_effective_sample_share_and_top_loss_share_worked_by_hand():
    # (3 + 1 + 2 + 0.5)^2 / (4 (9 + 1 + 4 + 0.25)) = 42.25 / 57
    assert float(effective_sample_share(torch.tensor([3.0, 1.0, 2.0, 0.5]))) == pytest.approx(42.25 / 57)
    assert float(effective_sample_share(torch.ones(8))) == 1.0
    assert float(effective_sample_share(torch.tensor([0.0, 2.0, 0.0, 2.0]))) == 0.5  # two of four carry it all
    assert effective_sample_share(torch.zeros(3)) is None
    # contributions 3, 2, 1, 2 of 8: the top ceil(0.1 * 4) = 1 rollout carries 3/8
    assert float(top_loss_share(torch.tensor([3.0, 2.0, 1.0, 2.0]))) == 0.375
    # 20 rollouts: the top 2 (5 and 4) of a total 5 + 4 + 18 * 0.5 = 18
    assert float(top_loss_share(torch.tensor([5.0, 4.0] + [0.5] * 18))) == pytest.approx(9 / 18)
    assert top_loss_share(torch.zeros(4)) is None


def test_group_accuracy_per_named_group():
    metric = GroupAccuracy()
    metric.update(["carry", "no_carry", None, "carry"], torch.tensor([0.0, 1.0, 1.0, 1.0]))  # None: left out
    metric.update(["carry"], torch.tensor([0.0]))
    assert metric.compute() == pytest.approx({"carry": 1 / 3, "no_carry": 1.0})


def test_the_shape_of_the_update_per_round_worked_by_hand():
    diagnostics = Diagnostics({}, markers=[])
    diagnostics.update_shape(torch.tensor([3.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5, 4.0]),
                             ["carry", "no_carry", "carry", "no_carry"], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    diagnostics.update_shape(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.ones(4))  # no labels: no group accuracy
    diagnostics.update_grad_norm(torch.tensor(2.0))
    diagnostics.update_grad_norm(torch.tensor(4.0))
    logged = diagnostics.compute()
    assert logged == pytest.approx({
        "diag/active/ess_share": (42.25 / 57 + 0.5) / 2,  # batch 2: 2^2 / (4 * 2)
        # batch 1: contributions 3, 2, 1, 2 -> 3/8; batch 2: 1, 1, 0, 0 -> 1/2
        "diag/active/top10_loss_share": (0.375 + 0.5) / 2,
        "diag/grad_norm": 3.0,
        "diag/group_accuracy/carry": 0.5, "diag/group_accuracy/no_carry": 1.0,
    })
    diagnostics.reset()
    assert diagnostics.compute() == {}


def test_diagnostic_weighters_keep_their_own_state_and_the_active_one_moves_once():
    inputs, texts = _batch()
    active = ReNIOWeighter(normalization="ema")
    weights = active(inputs)
    ema = active.ema_mean.clone()
    diagnostic = ReNIOWeighter(normalization="ema", ema_alpha=0.5)
    Diagnostics({"ema": diagnostic, "same": active}).update(inputs, weights, active, texts)
    torch.testing.assert_close(active.ema_mean, ema, rtol=0, atol=0)  # not run again, not touched
    torch.testing.assert_close(diagnostic.ema_mean, ema, rtol=0, atol=0)  # its first batch: the same batch mean
    assert diagnostic.ema_mean.data_ptr() != active.ema_mean.data_ptr()


def test_bad_diagnostics_settings_name_the_option():
    with pytest.raises(ConfigError, match=r"model\.diagnostics\.init_args\.weighters.*'active'"):
        Diagnostics({"active": LengthWeighter()})
    with pytest.raises(ConfigError, match=r"model\.diagnostics\.init_args\.weighters.*'renio\.4'"):
        Diagnostics({"renio.4": ReNIOWeighter()})
    with pytest.raises(ConfigError, match=r"model\.diagnostics\.init_args\.markers must be distinct"):
        Diagnostics(markers=["Wait", "wait"])


def _grouped(prompt_file: Path, folder: Path) -> Path:
    """The prompt file with a `group` field: `even` / `odd` by the problem's first number."""
    import json

    path = folder / "grouped.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "group": ["even", "odd"][i % 2]}) + "\n" for i, row in enumerate(rows)))
    return path


def _fit(model_dirs, prompt_file, folder: Path, diagnostics: bool) -> tuple[list[dict], dict]:
    """4 steps (2 rounds of 8 rollouts) of ReNIO distillation with the even-length verifier; default diagnostics or none."""
    student, teacher = str(model_dirs["student"]), str(model_dirs["teacher"])
    kwargs = {} if diagnostics else {"diagnostics": None}
    model = DistillationModule(student, teacher, weighter=ReNIOWeighter(threshold=0.0), **kwargs)
    data = OnPolicyDataModule(
        str(prompt_file), tokenizer=student, val_path=str(prompt_file), sampling=SamplingConfig(n=2, max_new_tokens=5),
        val_sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=3), prompts_per_epoch=4, batch_size=4,
        verifier=even_length, group_field="group",
    )
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=pl.loggers.CSVLogger(folder), enable_checkpointing=False,
        reload_dataloaders_every_n_epochs=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    assert not any("diagnostics" in key for key in model.state_dict())  # checkpoints unchanged
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    return rows, model.student.state_dict()


def test_a_real_fit_logs_round_diagnostics_and_trains_exactly_as_without(model_dirs, prompt_file, tmp_path):
    grouped = _grouped(prompt_file, tmp_path)
    on_rows, on_student = _fit(model_dirs, grouped, tmp_path / "on", True)
    off_rows, off_student = _fit(model_dirs, grouped, tmp_path / "off", False)
    losses = [[r["train/loss"] for r in rows if r.get("train/loss")] for rows in (on_rows, off_rows)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # the same losses, to the last digit logged
    assert all(torch.equal(on_student[k], off_student[k]) for k in on_student)  # hence the same gradients
    assert not any(k.startswith("diag/") for k in off_rows[0])
    logged = {k for row in on_rows for k, v in row.items() if v}
    for weighter in ("active", "uniform", "length", "entropy", "renio"):
        assert {f"diag/{weighter}/auroc_incorrect", f"diag/{weighter}/weight_correct",
                f"diag/{weighter}/weight_incorrect"} <= logged
    assert {"diag/active/pivotal_share", "diag/renio/pivotal_share", "diag/len_correct", "diag/len_incorrect",
            "diag/markers_correct", "diag/markers_incorrect", "diag/marker/let_me_check_incorrect"} <= logged
    rounds = [r for r in on_rows if r.get("diag/len_incorrect")]
    assert [r["epoch"] for r in rounds] == ["0", "1"]  # one row per round
    uniform = [float(r["diag/uniform/auroc_incorrect"]) for r in rounds if r["diag/uniform/auroc_incorrect"]]
    assert uniform and all(value == 0.5 for value in uniform)  # equal weights rank nothing
    assert all(math.isfinite(float(v)) for r in rounds for k, v in r.items() if k.startswith("diag/") and v)
    # the update's shape: one gradient norm per step, their mean per round; ESS share in (0, 1]
    norms = [(int(r["epoch"]), float(r["train/grad_norm"])) for r in on_rows if r.get("train/grad_norm")]
    assert len(norms) == 4 and all(n > 0 for _, n in norms)
    for r in rounds:
        of_round = [n for epoch, n in norms if epoch == int(r["epoch"])]
        assert float(r["diag/grad_norm"]) == pytest.approx(sum(of_round) / len(of_round), rel=1e-5)
        assert 0 < float(r["diag/active/ess_share"]) <= 1 and 0.1 <= float(r["diag/active/top10_loss_share"]) <= 1
        assert {"diag/group_accuracy/even", "diag/group_accuracy/odd"} <= {k for k, v in r.items() if v}
    # held-out accuracy per group, before training and after each round; its groups average to the whole
    evaluations = [r for r in on_rows if r.get("val/accuracy")]
    assert len(evaluations) == 3
    for r in evaluations:  # 12 problems, 6 per group
        mean_of_groups = (float(r["val/group_accuracy/even"]) + float(r["val/group_accuracy/odd"])) / 2
        assert mean_of_groups == pytest.approx(float(r["val/accuracy"]))

"""Weighters against values worked by hand (arithmetic in the comments)."""

import math

import pytest
import torch
from torch.testing import assert_close

from renio_pl.errors import ConfigError
from renio_pl.weighters import (
    EntropyWeighter, LengthWeighter, OracleWeighter, ReNIOWeighter, UniformWeighter, Weighter, WeighterInputs,
)


def renio_inputs(**kwargs) -> WeighterInputs:
    # row 0: l = [-1 - -3, -0.5 - -0.6, -2 - -5.5] = [2.0, 0.1, 3.5]; with tau 0.8 the pivotal
    #        tokens are 2.0 and 3.5, clipped at 2.5 -> mean(2.0, 2.5) = 2.25 -> u0 = e^2.25.
    # row 1: l = [-0.1, -0.1] (third token is padding): no pivotal token -> s = 0 -> u1 = 1.
    return WeighterInputs(
        student_logprobs=torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -0.3, 0.0]]),
        teacher_logprobs=torch.tensor([[-3.0, -0.6, -5.5], [-0.1, -0.2, 0.0]]),
        mask=torch.tensor([[True, True, True], [True, True, False]]),
        **kwargs,
    )


E225 = math.exp(2.25)


def test_renio_batch_mean_by_hand():
    weights = ReNIOWeighter()(renio_inputs())
    # w = u / mean(u) = [2 e^2.25 / (e^2.25 + 1), 2 / (e^2.25 + 1)] = [1.80929, 0.19070]
    assert_close(weights, torch.tensor([2 * E225 / (E225 + 1), 2 / (E225 + 1)]))
    assert_close(weights.mean(), torch.tensor(1.0))
    assert weights.dtype == torch.float32 and not weights.requires_grad


def test_renio_cap_none_clamp_temperature():
    assert_close(ReNIOWeighter(cap=1.5)(renio_inputs()), torch.tensor([1.5, 2 / (E225 + 1)]))
    assert_close(ReNIOWeighter(normalization="none")(renio_inputs()), torch.tensor([E225, 1.0]))
    # clamp: u = [9.4877, 1] is inside [0.1, 10], so it equals batch_mean without a cap
    assert_close(ReNIOWeighter(normalization="clamp")(renio_inputs()), torch.tensor([2 * E225 / (E225 + 1), 2 / (E225 + 1)]))
    # temperature 2: u0 = e^(2.25 / 2) = e^1.125
    e = math.exp(1.125)
    assert_close(ReNIOWeighter(temperature=2.0)(renio_inputs()), torch.tensor([2 * e / (e + 1), 2 / (e + 1)]))


def test_renio_clamp_clips_raw_weights():
    # one pivotal token of l = 3 with clip 5: u0 = e^3 = 20.09 -> clamped to 10; u1 = 1 -> [10, 1] / 5.5
    inputs = WeighterInputs(torch.tensor([[0.0], [0.0]]), torch.tensor([[-3.0], [0.0]]), torch.tensor([[True], [True]]))
    assert_close(ReNIOWeighter(clip=5.0, normalization="clamp")(inputs), torch.tensor([10 / 5.5, 1 / 5.5]))


def test_renio_ema_running_mean():
    weighter = ReNIOWeighter(normalization="ema", ema_alpha=0.1).train()
    first = weighter(renio_inputs())  # first batch sets m = mean(u) = (e^2.25 + 1) / 2
    assert_close(first, torch.tensor([2 * E225 / (E225 + 1), 2 / (E225 + 1)]))
    flat = WeighterInputs(torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))  # u = [1, 1]
    m = 0.9 * (E225 + 1) / 2 + 0.1 * 1.0
    assert_close(weighter(flat), torch.full((2,), 1 / m))
    assert_close(weighter.ema_mean, torch.tensor(m))
    weighter.eval()  # evaluation reads the running mean but never moves it
    weighter(renio_inputs())
    assert_close(weighter.ema_mean, torch.tensor(m))
    assert "ema_mean" in weighter.state_dict()


def test_renio_no_pivotal_token_gives_uniform():
    inputs = WeighterInputs(torch.full((3, 4), -1.0), torch.full((3, 4), -1.0), torch.ones(3, 4, dtype=torch.bool))
    assert_close(ReNIOWeighter()(inputs), torch.ones(3))


def test_renio_minus_inf_teacher_and_padding_rows():
    # row 0: teacher -inf -> l = +inf, pivotal, clipped to 2.5 -> u0 = e^2.5; row 1: all padding -> 0;
    # row 2: no pivotal -> u2 = 1; mean over the two rows with tokens = (e^2.5 + 1) / 2
    inputs = WeighterInputs(
        student_logprobs=torch.tensor([[-1.0, -1.0], [0.0, 0.0], [-1.0, -1.0]]),
        teacher_logprobs=torch.tensor([[float("-inf"), -1.0], [float("-inf"), float("-inf")], [-1.0, -1.0]]),
        mask=torch.tensor([[True, True], [False, False], [True, True]]),
    )
    # row 0's pivotal set is {+inf} only (the other token has l = 0): s = 2.5
    e = math.exp(2.5)
    for normalization in ("batch_mean", "none", "ema", "clamp"):
        weights = ReNIOWeighter(normalization=normalization)(inputs)
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        assert weights[1] == 0
    assert_close(ReNIOWeighter()(inputs), torch.tensor([2 * e / (e + 1), 0.0, 2 / (e + 1)]))


def test_renio_all_padding_batch_is_zero_and_finite():
    inputs = WeighterInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    for normalization in ("batch_mean", "none", "ema", "clamp"):
        assert_close(ReNIOWeighter(normalization=normalization)(inputs), torch.zeros(2))


def test_renio_bf16_inputs_and_statistics():
    inputs = renio_inputs()
    bf16 = WeighterInputs(inputs.student_logprobs.bfloat16(), inputs.teacher_logprobs.bfloat16(), inputs.mask)
    weighter = ReNIOWeighter()
    weights = weighter(bf16)
    assert weights.dtype == torch.float32
    stats = weighter.statistics(inputs, weighter(inputs))
    assert_close(stats["pivotal_share"], torch.tensor(2 / 5))  # 2 pivotal of 5 generated tokens
    assert_close(stats["max"], torch.tensor(2 * E225 / (E225 + 1)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalization": "mean"}, "normalization must be one of batch_mean, none, ema, clamp; got 'mean'"),
        ({"clip": 0.0}, "clip must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"cap": 0.5}, "cap must be >= 1"),
        ({"scope": "node"}, "scope must be micro_batch or global"),
    ],
)
def test_renio_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReNIOWeighter(**kwargs)


def labelled(correct):
    n = len(correct)
    return WeighterInputs(torch.zeros(n, 2), torch.zeros(n, 2), torch.ones(n, 2, dtype=torch.bool), correct=torch.tensor(correct))


def test_oracle_modes_by_hand():
    inputs = labelled([1.0, 0.0, 0.0, 1.0])
    # keep the incorrect two: [0, 1, 1, 0] / mean 0.5 = [0, 2, 2, 0]
    assert_close(OracleWeighter("incorrect_only")(inputs), torch.tensor([0.0, 2.0, 2.0, 0.0]))
    assert_close(OracleWeighter("correct_only")(inputs), torch.tensor([2.0, 0.0, 0.0, 2.0]))
    # mix 0.75: [0.25, 0.75, 0.75, 0.25] / mean 0.5
    assert_close(OracleWeighter("mix", alpha=0.75)(inputs), torch.tensor([0.5, 1.5, 1.5, 0.5]))


def test_oracle_nothing_kept_gives_zeros():
    assert_close(OracleWeighter("incorrect_only")(labelled([1.0, 1.0])), torch.zeros(2))


def test_oracle_without_labels_is_a_clear_error():
    inputs = WeighterInputs(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="needs correctness labels.*data.answer_field"):
        OracleWeighter()(inputs)


def test_length_weighter_by_hand():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    inputs = WeighterInputs(torch.zeros(2, 3), torch.zeros(2, 3), mask)
    assert_close(LengthWeighter()(inputs), torch.tensor([1.5, 0.5]))  # [3, 1] / 2
    assert_close(LengthWeighter(power=2.0)(inputs), torch.tensor([1.8, 0.2]))  # [9, 1] / 5


def test_entropy_weighter_by_hand():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])  # the 9.0 is padding
    inputs = WeighterInputs(torch.zeros(2, 3), torch.zeros(2, 3), mask, student_entropy=entropy)
    assert_close(EntropyWeighter()(inputs), torch.tensor([1.6, 0.4]))  # [2, 0.5] / 1.25
    zero = WeighterInputs(torch.zeros(2, 3), torch.zeros(2, 3), mask, student_entropy=torch.zeros(2, 3))
    assert_close(EntropyWeighter()(zero), torch.ones(2))
    with pytest.raises(ValueError, match="student_entropy"):
        EntropyWeighter()(WeighterInputs(torch.zeros(2, 3), torch.zeros(2, 3), mask))


def test_uniform_and_contract():
    mask = torch.tensor([[True, False], [False, False]])
    assert_close(UniformWeighter()(WeighterInputs(torch.zeros(2, 2), torch.zeros(2, 2), mask)), torch.tensor([1.0, 0.0]))
    for cls in (UniformWeighter, OracleWeighter, LengthWeighter, EntropyWeighter, ReNIOWeighter):
        assert issubclass(cls, Weighter) and issubclass(cls, torch.nn.Module)
    student = torch.zeros(2, 2, requires_grad=True)
    weights = LengthWeighter()(WeighterInputs(student, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool)))
    assert not weights.requires_grad


def test_renio_ema_uncapped_by_hand():
    # clip 5: row 0's pivotal l = 2.0, 3.5 -> s0 = 2.75, u = [e^2.75, 1]; the first batch sets
    # m = mean(u) = (e^2.75 + 1) / 2 = 8.321 and w = u / m = [1.880, 0.120].
    # A second batch of u = [e^3, e^3] (one pivotal token l = 3 each): m <- 0.9 m + 0.1 e^3 = 9.498,
    # w = e^3 / m = 2.115 each, not capped; at a cap of 2 both would be 2.
    second = WeighterInputs(torch.zeros(2, 1), torch.full((2, 1), -3.0), torch.ones(2, 1, dtype=torch.bool))
    uncapped = ReNIOWeighter(normalization="ema", cap=None, clip=5.0)
    e275 = math.exp(2.75)
    assert_close(uncapped(renio_inputs()), torch.tensor([2 * e275 / (e275 + 1), 2 / (e275 + 1)]))
    m = 0.9 * (e275 + 1) / 2 + 0.1 * math.exp(3.0)
    assert math.exp(3.0) / m > 2.1
    assert_close(uncapped(second), torch.full((2,), math.exp(3.0) / m))
    capped = ReNIOWeighter(normalization="ema", cap=2.0, clip=5.0)
    capped(renio_inputs())
    assert_close(capped(second), torch.full((2,), 2.0))
    assert_close(ReNIOWeighter(cap=None)(renio_inputs()), ReNIOWeighter(cap=10.0)(renio_inputs()))


def test_renio_clip_before_threshold_by_hand():
    # threshold 2.2 > clip 2.0. Row 0: l = [2.0, 0.1, 3.5].
    # Ours (threshold first): pivotal = {3.5}, clipped to 2 -> s0 = 2; row 1 none -> s1 = 0:
    #   u = [e^2, 1] -> w = [2 e^2 / (e^2 + 1), 2 / (e^2 + 1)].
    # Release (clip first): min(l, 2) = [2.0, 0.1, 2.0] < 2.2 everywhere: no pivotal token, u = [1, 1] -> w = [1, 1].
    e2 = math.exp(2.0)
    ours = ReNIOWeighter(threshold=2.2, clip=2.0)
    release = ReNIOWeighter(threshold=2.2, clip=2.0, clip_before_threshold=True)
    assert_close(ours(renio_inputs()), torch.tensor([2 * e2 / (e2 + 1), 2 / (e2 + 1)]))
    assert_close(release(renio_inputs()), torch.tensor([1.0, 1.0]))
    assert release.pivotal(renio_inputs()).sum() == 0
    # at threshold 2.0 == clip the release's order keeps 2.0 and the clipped 3.5: s0 = 2 either way
    assert_close(ReNIOWeighter(threshold=2.0, clip=2.0, clip_before_threshold=True)(renio_inputs()),
                 ReNIOWeighter(threshold=2.0, clip=2.0)(renio_inputs()))
    # below the clip (the paper configs' thresholds) the two orders agree: the default test's weights
    assert_close(ReNIOWeighter(clip_before_threshold=True)(renio_inputs()), ReNIOWeighter()(renio_inputs()))

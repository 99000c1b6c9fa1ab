"""Losses against hand computations and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from renio_pl.errors import ConfigError
from renio_pl.losses import ForwardKL, GeneralizedJSD, ReverseKL, SampledReverseKL, weighted_loss

# One position, vocabulary of 2: teacher p_T = [0.5, 0.5], student p_S = [0.25, 0.75].
TEACHER = torch.tensor([[0.5, 0.5]]).log()
STUDENT = torch.tensor([[0.25, 0.75]]).log()
TARGET = torch.tensor([1])


def test_forward_kl_by_hand():
    # KL(T || S) = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4 / 3)
    assert_close(ForwardKL()(STUDENT, TEACHER, TARGET), torch.tensor([0.5 * math.log(4 / 3)]))


def test_forward_kl_clamp_by_hand():
    # entries: 0.5 ln 2 = 0.3466 -> clamped to 0.05; 0.5 ln(2 / 3) = -0.2027 -> clamped to 0
    assert_close(ForwardKL(clamp=0.05)(STUDENT, TEACHER, TARGET), torch.tensor([0.05]))


def test_reverse_kl_by_hand():
    # KL(S || T) = 0.25 ln(0.25 / 0.5) + 0.75 ln(0.75 / 0.5)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert_close(ReverseKL()(STUDENT, TEACHER, TARGET), torch.tensor([expected]))


def test_jsd_half_by_hand():
    # M = 0.5 T + 0.5 S = [0.375, 0.625]
    kl_t = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_s = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    assert_close(GeneralizedJSD(0.5)(STUDENT, TEACHER, TARGET), torch.tensor([0.5 * kl_t + 0.5 * kl_s]))
    # beta 0.25 weights the teacher term by 0.25, with M = 0.25 T + 0.75 S = [0.3125, 0.6875]
    kl_t = 0.5 * math.log(0.5 / 0.3125) + 0.5 * math.log(0.5 / 0.6875)
    kl_s = 0.25 * math.log(0.25 / 0.3125) + 0.75 * math.log(0.75 / 0.6875)
    assert_close(GeneralizedJSD(0.25)(STUDENT, TEACHER, TARGET), torch.tensor([0.25 * kl_t + 0.75 * kl_s]))


def test_jsd_limits_equal_the_two_kls():
    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(5, 11), -1)
    teacher = torch.log_softmax(torch.randn(5, 11), -1)
    targets = torch.zeros(5, dtype=torch.long)
    forward = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # KL(T || S)
    reverse = F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1)  # KL(S || T)
    assert_close(GeneralizedJSD(0.0)(student, teacher, targets), forward)
    assert_close(GeneralizedJSD(1.0)(student, teacher, targets), reverse)
    assert_close(ForwardKL()(student, teacher, targets), forward)
    assert_close(ReverseKL()(student, teacher, targets), reverse)
    # symmetric JSD is bounded by ln 2 and is symmetric in its arguments
    jsd = GeneralizedJSD(0.5)(student, teacher, targets)
    assert_close(jsd, GeneralizedJSD(0.5)(teacher, student, targets))
    assert (jsd <= math.log(2) + 1e-6).all() and (jsd >= 0).all()


def test_forward_kl_gradient_is_p_student_minus_p_teacher():
    torch.manual_seed(1)
    student_logits = torch.randn(4, 7, requires_grad=True)
    teacher_logits = torch.randn(4, 7)
    loss = ForwardKL()(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1), torch.zeros(4, dtype=torch.long))
    loss.sum().backward()
    assert_close(student_logits.grad, torch.softmax(student_logits, -1).detach() - torch.softmax(teacher_logits, -1))


def test_sampled_reverse_kl_value_and_gradient():
    student_logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # p_S = [0.25, 0.75]
    loss = SampledReverseKL()(torch.log_softmax(student_logits, -1), TEACHER, TARGET)
    # l = ln 0.75 - ln 0.5 = ln 1.5; value = ln 1.5 * ln 0.75
    assert_close(loss, torch.tensor([math.log(1.5) * math.log(0.75)]))
    loss.sum().backward()
    # d ln p_S(1) / dz = onehot(1) - p_S = [-0.25, 0.25], scaled by the stop-gradient l
    assert_close(student_logits.grad, math.log(1.5) * torch.tensor([[-0.25, 0.25]]))


def test_minus_inf_teacher_gives_finite_losses():
    teacher = torch.tensor([[0.0, float("-inf")]])  # p_T = [1, 0]
    student = torch.tensor([[0.5, 0.5]]).log()
    for loss in (ForwardKL(), ForwardKL(clamp=0.05), ReverseKL(), GeneralizedJSD(0.5), GeneralizedJSD(1.0), SampledReverseKL()):
        value = loss(student, teacher, TARGET)
        assert torch.isfinite(value).all(), type(loss).__name__
    assert_close(ForwardKL()(student, teacher, TARGET), torch.tensor([math.log(2.0)]))  # 1 * ln(1 / 0.5)


def test_weighted_loss_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    weights = torch.tensor([0.5, 1.5, 1.0])
    # L = [mean(1, 2, 3), 4, 0 (no tokens)] = [2, 4, 0]; mean(0.5 * 2, 1.5 * 4, 1 * 0) = 7 / 3
    assert_close(weighted_loss(token_loss, mask, weights), torch.tensor(7 / 3))
    assert_close(weighted_loss(token_loss, mask, torch.zeros(3)), torch.tensor(0.0))


def test_token_reduction_by_hand():
    # lengths 1 and 4, token losses [1] and [0, 0, 0, 0]:
    # sample: mean(1 / 1, 0 / 4) = 0.5; token (TRD's release): (1 + 0) / (1 + 4) = 0.2
    token_loss = torch.tensor([[1.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    ones = torch.ones(2)
    assert_close(weighted_loss(token_loss, mask, ones), torch.tensor(0.5))
    assert_close(weighted_loss(token_loss, mask, ones, "token"), torch.tensor(0.2))
    # weighted: (2 * 1 + 0.5 * 0) / 5 = 0.4; a row without tokens adds nothing to the count
    assert_close(weighted_loss(token_loss, mask, torch.tensor([2.0, 0.5]), "token"), torch.tensor(0.4))
    empty = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert_close(weighted_loss(token_loss, empty, ones, "token"), torch.tensor(1.0))
    # the gradient reaches each token as w_i / sum |M| (token) and w_i / (B |M_i|) (sample)
    values = torch.tensor([[3.0, 0.0], [1.0, 2.0]], requires_grad=True)
    mask2 = torch.tensor([[True, False], [True, True]])
    weighted_loss(values, mask2, torch.tensor([1.0, 3.0]), "token").backward()
    assert_close(values.grad, torch.tensor([[1 / 3, 0.0], [1.0, 1.0]]))



def test_token_reduction_over_processes_and_accumulation_by_hand():
    """The TRD release's count: one micro-step's tokens over every process, each micro-step its own.

    Lengths 1 and 4, token losses [1] and [0, 0, 0, 0]. On two processes at the same micro-step
    (N = 5) each loss is `P S_r / N` and DDP averages the gradients: (0.4 + 0) / 2 = 0.2, as one
    process with both rollouts in one batch. On one process with `accumulate_grad_batches` 2, one
    rollout per micro-batch, Lightning divides each loss by 2: (1 / 1 + 0 / 4) / 2 = 0.5.
    """
    values = [torch.tensor([[1.0]], requires_grad=True), torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)]
    masks = [torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)]
    one = torch.ones(1)
    per_process = [weighted_loss(v, m, one, "token", global_tokens=torch.tensor(5), processes=2) for v, m in zip(values, masks)]
    assert_close(torch.stack(per_process), torch.tensor([0.4, 0.0]))
    (sum(per_process) / 2).backward()  # DDP's average over the 2 processes
    assert_close(values[0].grad, torch.tensor([[0.2]]))
    assert_close(values[1].grad, torch.full((1, 4), 0.2))  # every token 1 / 5, as in one batch of both:
    both = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    weighted_loss(both, torch.cat([torch.tensor([[True, False, False, False]]), masks[1]]), torch.ones(2), "token").backward()
    assert_close(both.grad, torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]]))
    for v in values:
        v.grad = None
    accumulated = [weighted_loss(v, m, one, "token") / 2 for v, m in zip(values, masks)]  # Lightning's / G
    assert_close(sum(accumulated), torch.tensor(0.5))
    sum(accumulated).backward()
    assert_close(values[0].grad, torch.tensor([[0.5]]))  # 1 / (G N_1)
    assert_close(values[1].grad, torch.full((1, 4), 0.125))  # 1 / (G N_2)
    # the default count is the batch's own and P is 1: the one-process value, unchanged
    assert weighted_loss(both, masks[1].repeat(2, 1), torch.ones(2), "token").item() == 1.0 / 8

def test_every_loss_takes_a_reduction():
    for make in (ForwardKL, ReverseKL, GeneralizedJSD, SampledReverseKL):
        assert make().reduction == "sample" and make(reduction="token").reduction == "token"
    with pytest.raises(ConfigError, match="reduction must be sample or token"):
        ForwardKL(reduction="batch")


@pytest.mark.parametrize("make", [lambda: ForwardKL(clamp=0.0), lambda: GeneralizedJSD(1.5)])
def test_bad_loss_options(make):
    with pytest.raises(ConfigError):
        make()

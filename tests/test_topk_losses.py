"""Top-k distillation losses: hand computations, k = V against the full-vocabulary losses, the server view."""

import math

import pytest
import torch
from torch.testing import assert_close

from renio_pl.errors import ConfigError
from renio_pl.losses import (
    TEACHER_NEEDS, ForwardKL, GeneralizedJSD, ReverseKL, SampledReverseKL, TeacherTopK, TopKForwardKL,
)

# One position, vocabulary of 4: teacher [0.5, 0.3, 0.15, 0.05], student [0.25, 0.25, 0.25, 0.25].
TEACHER = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
STUDENT = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
TARGET = torch.tensor([2])


def test_renormalised_top2_by_hand():
    # top-2 {0, 1}: teacher renormalised [0.625, 0.375], student renormalised [0.5, 0.5]
    expected = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    value = TopKForwardKL(top_k=2, tail="renormalise")(STUDENT, TEACHER, TARGET)
    assert_close(value, torch.tensor([expected]))


def test_tail_bucket_top2_by_hand():
    # buckets {0}, {1}, rest: teacher [0.5, 0.3, 0.2], student [0.25, 0.25, 0.5]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    value = TopKForwardKL(top_k=2, tail="bucket")(STUDENT, TEACHER, TARGET)
    assert_close(value, torch.tensor([expected]))


def test_sampled_reverse_kl_by_hand_from_top_k_view():
    # only the sampled token's teacher log-prob enters: (ln 0.25 - ln 0.15) * ln 0.25
    teacher = TeacherTopK(torch.tensor([math.log(0.15)]), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0))
    value = SampledReverseKL().forward_top_k(STUDENT, teacher, TARGET)
    assert_close(value, torch.tensor([(math.log(0.25) - math.log(0.15)) * math.log(0.25)]))


@pytest.mark.parametrize("tail", TopKForwardKL.TAILS)
def test_k_equal_vocabulary_is_the_full_forward_kl(tail):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 11, generator=generator, requires_grad=True)
    teacher = torch.log_softmax(3 * torch.randn(6, 11, generator=generator), -1)
    targets = torch.randint(0, 11, (6,), generator=generator)
    student_logprobs = torch.log_softmax(student, -1)
    top = TopKForwardKL(top_k=11, tail=tail)(student_logprobs, teacher, targets)
    full = ForwardKL()(student_logprobs, teacher, targets)
    assert_close(top, full, atol=1e-6, rtol=1e-5)
    (grad_top,) = torch.autograd.grad(top.sum(), student, retain_graph=True)
    (grad_full,) = torch.autograd.grad(full.sum(), student)
    assert_close(grad_top, grad_full, atol=1e-6, rtol=1e-5)


def test_top_k_losses_never_negative_and_bucket_bounds():
    # both are KLs of proper distributions (>= 0); the bucket version is a coarsening of the full
    # KL, so it never exceeds it (data processing inequality)
    generator = torch.Generator().manual_seed(1)
    student = torch.log_softmax(torch.randn(64, 50, generator=generator), -1)
    teacher = torch.log_softmax(2 * torch.randn(64, 50, generator=generator), -1)
    targets = torch.randint(0, 50, (64,), generator=generator)
    full = ForwardKL()(student, teacher, targets)
    for k in (1, 5, 20):
        bucket = TopKForwardKL(top_k=k, tail="bucket")(student, teacher, targets)
        renormalised = TopKForwardKL(top_k=k, tail="renormalise")(student, teacher, targets)
        assert (bucket >= -1e-6).all() and (renormalised >= -1e-6).all()
        assert (bucket <= full + 1e-5).all()
    # k = 1 renormalised: one outcome, KL 0 everywhere
    assert_close(TopKForwardKL(top_k=1, tail="renormalise")(student, teacher, targets), torch.zeros(64))


def test_in_process_and_server_views_agree():
    generator = torch.Generator().manual_seed(2)
    student = torch.log_softmax(torch.randn(8, 30, generator=generator), -1)
    teacher = torch.log_softmax(torch.randn(8, 30, generator=generator), -1)
    targets = torch.randint(0, 30, (8,), generator=generator)
    for loss in (TopKForwardKL(top_k=5), TopKForwardKL(top_k=5, tail="renormalise"), SampledReverseKL()):
        # the server gives more than the loss reads (top 8): the loss takes the first top_k
        view = TeacherTopK.from_logprobs(teacher, targets, 8)
        assert_close(loss.forward_top_k(student, view, targets), loss(student, teacher, targets))


def test_declared_teacher_needs():
    assert SampledReverseKL.teacher_needs == "sampled"
    assert TopKForwardKL.teacher_needs == "top_k"
    for loss in (ForwardKL, ReverseKL, GeneralizedJSD):
        assert loss.teacher_needs == "vocabulary"
    assert {SampledReverseKL.teacher_needs, TopKForwardKL.teacher_needs, ForwardKL.teacher_needs} == set(TEACHER_NEEDS)


def test_bad_settings_one_line():
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        TopKForwardKL(top_k=0)
    with pytest.raises(ConfigError, match="tail must be renormalise or bucket"):
        TopKForwardKL(tail="drop")
    narrow = TeacherTopK.from_logprobs(TEACHER, TARGET, 2)
    with pytest.raises(ConfigError, match="teacher gives 2"):
        TopKForwardKL(top_k=3).forward_top_k(STUDENT, narrow, TARGET)


def test_teacher_minus_inf_is_floored():
    teacher = torch.tensor([[0.0, float("-inf"), float("-inf"), float("-inf")]])
    value = TopKForwardKL(top_k=2, tail="bucket")(STUDENT, teacher, TARGET)
    assert torch.isfinite(value).all()
    assert_close(value, torch.tensor([math.log(4.0)]))  # all teacher mass on token 0

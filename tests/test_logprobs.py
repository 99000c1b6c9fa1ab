"""Chunked scoring against an unchunked full-logits reference on tiny real Qwen3 models."""

import pytest
import torch
from torch.testing import assert_close

from renio_pl.logprobs import completion_hidden_states, score_tokens
from renio_pl.losses import ForwardKL, SampledReverseKL, weighted_loss
from renio_pl.rollouts import Rollout, collate_rollouts
from tests.conftest import tiny_qwen3

VOCAB = 40
TEMPERATURE = 1.3


def make_batch():
    rollouts = [
        Rollout([5, 6, 7, 8], [9, 10, 11], 0, TEMPERATURE),
        Rollout([12, 13], [14, 1], 1, TEMPERATURE),  # shorter prompt: left padding; ends with EOS
        Rollout([15, 16, 17], [18, 19, 20, 21, 22], 2, TEMPERATURE),
    ]
    return rollouts, collate_rollouts(rollouts, pad_token_id=0)


def reference(model, rollouts, temperature):
    """Per-row, unpadded forward: log_softmax(logits / T) at each completion position, (T_i, V)."""
    rows = []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1]
        rows.append(torch.log_softmax(logits.float() / temperature, -1))
    return rows


def run_scoring(student, teacher, batch, loss, chunk_tokens):
    student_hidden = completion_hidden_states(student, batch.input_ids, batch.attention_mask, batch.prompt_length)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, batch.input_ids, batch.attention_mask, batch.prompt_length)
    return score_tokens(
        student_hidden, student.get_output_embeddings(), teacher_hidden, teacher.get_output_embeddings(),
        batch.completion_ids, batch.completion_mask, batch.temperature, loss, chunk_tokens,
    )


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_scores_match_unpadded_reference(chunk_tokens):
    student, teacher = tiny_qwen3(0, VOCAB), tiny_qwen3(1, VOCAB)
    rollouts, batch = make_batch()
    scores = run_scoring(student, teacher, batch, ForwardKL(), chunk_tokens)
    with torch.no_grad():
        ref_student, ref_teacher = reference(student, rollouts, TEMPERATURE), reference(teacher, rollouts, TEMPERATURE)
    for i, r in enumerate(rollouts):
        n, targets = len(r.completion_ids), torch.tensor(r.completion_ids)
        assert_close(scores.student_logprobs[i, :n], ref_student[i].gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
        assert_close(scores.teacher_logprobs[i, :n], ref_teacher[i].gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
        entropy = -(ref_student[i].exp() * ref_student[i]).sum(-1)
        assert_close(scores.student_entropy[i, :n], entropy, atol=1e-5, rtol=1e-5)
        kl = (ref_teacher[i].exp() * (ref_teacher[i] - ref_student[i])).sum(-1)
        assert_close(scores.token_loss[i, :n].detach(), kl, atol=1e-5, rtol=1e-5)
        assert (scores.student_logprobs[i, n:] == 0).all() and (scores.token_loss[i, n:] == 0).all()


def test_chunked_gradients_equal_reference_gradients():
    rollouts, batch = make_batch()
    weights = torch.tensor([0.5, 2.0, 0.5])

    def grads(chunk_tokens):
        student, teacher = tiny_qwen3(0, VOCAB), tiny_qwen3(1, VOCAB)
        scores = run_scoring(student, teacher, batch, SampledReverseKL(), chunk_tokens)
        weighted_loss(scores.token_loss, batch.completion_mask, weights).backward()
        return {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}

    def reference_grads():
        student, teacher = tiny_qwen3(0, VOCAB), tiny_qwen3(1, VOCAB)
        total = 0.0
        with torch.no_grad():
            ref_teacher = reference(teacher, rollouts, TEMPERATURE)
        for i, (r, logp) in enumerate(zip(rollouts, reference(student, rollouts, TEMPERATURE))):
            targets = torch.tensor(r.completion_ids)
            s = logp.gather(-1, targets[:, None]).squeeze(-1)
            t = ref_teacher[i].gather(-1, targets[:, None]).squeeze(-1)
            total = total + weights[i] * ((s - t).detach() * s).mean()
        (total / len(rollouts)).backward()
        return {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}

    expected = reference_grads()
    for chunk_tokens in (2, 1000):
        got = grads(chunk_tokens)
        assert got.keys() == expected.keys()
        for name in expected:
            assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_empty_batch_scores_to_zero_and_backpropagates():
    student, teacher = tiny_qwen3(0, VOCAB), tiny_qwen3(1, VOCAB)
    _, batch = make_batch()
    batch.completion_mask[:] = False
    scores = run_scoring(student, teacher, batch, ForwardKL(), 4)
    loss = weighted_loss(scores.token_loss, batch.completion_mask, torch.ones(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)


class MaskedHead(torch.nn.Module):
    """A teacher head that gives some tokens probability 0 (logit -inf), as a masked vocabulary does."""

    def __init__(self, head: torch.nn.Module, banned: list[int]) -> None:
        super().__init__()
        self.head, self.banned = head, banned

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.banned] = float("-inf")
        return logits


@pytest.mark.parametrize("loss_name", ["ForwardKL", "ReverseKL", "GeneralizedJSD", "SampledReverseKL"])
def test_edge_rows_keep_loss_weights_and_gradients_finite(loss_name):
    """-inf teacher log-prob on a sampled token, an EOS-only completion and an all-padding row."""
    from renio_pl import losses
    from renio_pl.weighters import ReNIOWeighter, WeighterInputs

    student, teacher = tiny_qwen3(0, VOCAB), tiny_qwen3(1, VOCAB)
    rollouts = [
        Rollout([5, 6, 7], [9, 10, 11], 0, TEMPERATURE),  # token 10 is impossible under the teacher
        Rollout([12, 13], [1], 1, TEMPERATURE),  # EOS at its first token
        Rollout([15], [18, 19], 2, TEMPERATURE),
    ]
    batch = collate_rollouts(rollouts, pad_token_id=0)
    batch.completion_mask[2] = False  # a row with no trained token at all
    loss = getattr(losses, loss_name)()
    student_hidden = completion_hidden_states(student, batch.input_ids, batch.attention_mask, batch.prompt_length)
    with torch.no_grad():
        teacher_hidden = completion_hidden_states(teacher, batch.input_ids, batch.attention_mask, batch.prompt_length)
    scores = score_tokens(
        student_hidden, student.get_output_embeddings(), teacher_hidden,
        MaskedHead(teacher.get_output_embeddings(), banned=[10, 30]), batch.completion_ids, batch.completion_mask,
        batch.temperature, loss, chunk_tokens=2,
    )
    assert scores.teacher_logprobs[0, 1] == float("-inf")  # the case is really there
    weights = ReNIOWeighter(threshold=0.8)(WeighterInputs(
        scores.student_logprobs, scores.teacher_logprobs, batch.completion_mask, scores.student_entropy
    ))
    total = weighted_loss(scores.token_loss, batch.completion_mask, weights)
    total.backward()
    assert torch.isfinite(weights).all() and weights[2] == 0 and weights[0] > weights[1]
    assert torch.isfinite(total) and (total > 0 or loss_name == "SampledReverseKL")  # its surrogate can be < 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)

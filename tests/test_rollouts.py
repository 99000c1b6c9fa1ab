"""Batch layout by hand; the HF engine on a tiny real Qwen3 (seeded, n samples, EOS, greedy)."""

import pytest
import torch
from transformers import GenerationConfig

from renio_pl.errors import ConfigError
from renio_pl.rollouts import HFGenerator, Rollout, SamplingConfig, collate_rollouts
from tests.conftest import tiny_qwen3, tiny_tokenizer


def test_collate_layout_by_hand():
    batch = collate_rollouts(
        [Rollout([5, 6, 7], [8, 1], 0, 0.7, correct=True), Rollout([9], [10, 11, 12], 1, 0.7, correct=False)],
        pad_token_id=0,
    )
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 1, 0], [0, 0, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[8, 1, 0], [10, 11, 12]]
    assert batch.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.correct.tolist() == [1.0, 0.0] and batch.temperature == 0.7
    assert collate_rollouts([Rollout([5], [6], 0, 1.0)], 0).correct is None
    assert collate_rollouts([Rollout([5], [6], 0, 0.0)], 0).temperature == 1.0  # greedy rollouts score at T = 1


@pytest.fixture(scope="module")
def policy():
    tokenizer = tiny_tokenizer()
    return tiny_qwen3(3, len(tokenizer)), tokenizer


def test_hf_engine_is_seeded_and_samples_n(policy):
    model, tokenizer = policy
    prompts = [tokenizer("1+2=")["input_ids"], tokenizer("What is 3?")["input_ids"], tokenizer("7")["input_ids"]]
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=6)
    engine = HFGenerator(batch_size=2)
    model.train()
    first = engine.generate(model, tokenizer, prompts, sampling, [11, 12, 13])
    assert model.training  # the engine restores the mode it found
    assert first == engine.generate(model, tokenizer, prompts, sampling, [11, 12, 13])
    assert first != engine.generate(model, tokenizer, prompts, sampling, [11, 12, 14])
    assert len(first) == 3 and all(len(group) == 3 for group in first)
    for group in first:
        for completion in group:
            assert 1 <= len(completion) <= 6
            assert tokenizer.eos_token_id not in completion[:-1]  # cut at the first EOS, kept


def test_hf_engine_greedy_is_argmax_and_batch_independent(policy):
    model, tokenizer = policy
    prompts = [tokenizer("12+3=")["input_ids"], tokenizer("9")["input_ids"]]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=4)
    batched = HFGenerator(batch_size=2).generate(model, tokenizer, prompts, greedy, [0, 1])
    single = HFGenerator(batch_size=1).generate(model, tokenizer, prompts, greedy, [5, 6])
    assert batched == single
    ids = list(prompts[1])
    with torch.no_grad():
        for token in batched[1][0]:
            assert token == int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_new_tokens": 0}]
)
def test_bad_sampling_options(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


def test_hf_engine_samples_are_keyed_not_batched(policy):
    """A sample depends on its prompt's seed only: not on batch size, order or neighbours."""
    model, tokenizer = policy
    prompts = [tokenizer(text)["input_ids"] for text in ("1+2=", "What is 3?", "7", "88*9")]
    sampling = SamplingConfig(n=3, temperature=1.3, top_k=30, top_p=0.9, max_new_tokens=6)
    together = HFGenerator(batch_size=4).generate(model, tokenizer, prompts, sampling, [1, 2, 3, 4])
    alone = [HFGenerator(batch_size=1).generate(model, tokenizer, [p], sampling, [s])[0] for p, s in zip(prompts, [1, 2, 3, 4])]
    reversed_order = HFGenerator(batch_size=3).generate(model, tokenizer, prompts[::-1], sampling, [4, 3, 2, 1])
    assert together == alone == reversed_order[::-1]
    assert len({tuple(map(tuple, group)) for group in together}) == 4


def test_hf_engine_ignores_the_checkpoint_generation_config(policy):
    """Qwen3 checkpoints ship temperature 0.6 / top_k 20; sampling must follow SamplingConfig only."""
    model, tokenizer = policy
    prompts = [tokenizer("12+3=")["input_ids"]]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=5)
    plain = HFGenerator().generate(model, tokenizer, prompts, greedy, [0])
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_k=20, repetition_penalty=5.0, no_repeat_ngram_size=1, eos_token_id=1
    )
    try:
        assert HFGenerator().generate(model, tokenizer, prompts, greedy, [0]) == plain
    finally:
        model.generation_config = saved

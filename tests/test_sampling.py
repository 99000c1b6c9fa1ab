"""Keyed sampling: the hash against a plain-integer reference, and Gumbel-max draws matching softmax."""

import math

import torch

from renio_pl.sampling import KeyedGumbelSampler, keyed_uniform, stream_key

MASK = (1 << 64) - 1


def reference_mix(x: int) -> int:
    """splitmix64's finaliser written on unbounded Python ints (the published constants)."""
    x &= MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_uniform_matches_integer_reference():
    keys = torch.tensor([stream_key(3, 0), stream_key(3, 1), -5, 2**62], dtype=torch.int64)
    uniform = keyed_uniform(keys, step=7, width=11)
    golden = 0x9E3779B97F4A7C15
    for r, key in enumerate(keys.tolist()):
        row = reference_mix((key + golden * 8) & MASK)
        for v in range(11):
            bits = reference_mix(row ^ ((v * golden) & MASK))
            assert uniform[r, v].item() == ((bits >> 11) + 0.5) * 2.0**-53
    assert ((uniform > 0) & (uniform < 1)).all()


def test_stream_keys_differ_and_repeat():
    keys = {stream_key(seed, j) for seed in range(50) for j in range(20)}
    assert len(keys) == 1000
    assert stream_key(7, 2) == stream_key(7, 2) and stream_key(7, 2) != stream_key(2, 7)


def test_draws_follow_softmax_with_temperature_top_k_and_top_p():
    """60k keyed draws from fixed logits: frequencies within 5 sigma of the filtered softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 60_000
    keys = torch.tensor([stream_key(11, j) for j in range(rows)])
    scores = logits.expand(rows, -1).clone()
    input_ids = torch.zeros(rows, 4, dtype=torch.long)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8)]:
        sampler = KeyedGumbelSampler(keys, prompt_width=3, temperature=temperature, top_k=top_k, top_p=top_p)
        draws = sampler(input_ids, scores).argmax(dim=1)
        expected = torch.softmax(logits[0] / temperature, dim=0)
        if top_k:
            expected[top_k:] = 0  # logits are sorted, so top-k keeps the first k
        if top_p < 1.0:  # smallest prefix with mass >= top_p
            cut = int((expected.cumsum(0) < top_p).sum()) + 1
            expected[cut:] = 0
        expected /= expected.sum()
        observed = torch.bincount(draws, minlength=6).double() / rows
        for p, f in zip(expected.tolist(), observed.tolist()):
            assert abs(f - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / rows) + 1e-12, (temperature, top_k, top_p)


def test_steps_give_independent_draws():
    keys = torch.tensor([stream_key(1, j) for j in range(5000)])
    first = keyed_uniform(keys, 0, 3)
    second = keyed_uniform(keys, 1, 3)
    correlation = torch.corrcoef(torch.stack([first[:, 0], second[:, 0]]))[0, 1]
    assert abs(float(correlation)) < 0.05

"""Keyed sampling: every sample draws from its own random stream, named by a key.

A rollout's randomness comes from a counter-based hash of (its key, the decoding step, the
token id), turned into Gumbel noise: `argmax(logits / T + Gumbel)` is an exact draw from
`softmax(logits / T)` (after top-k / top-p filtering). The key of sample `j` of a prompt is
`stream_key(prompt_seed, j)`, and the data module derives `prompt_seed` from the run seed,
the epoch and the prompt's index. So a sample does not depend on which other prompts share
its batch, on the engine's batch size, on the number of processes, or on where a resumed
run picked up: the same key gives the same tokens (up to floating-point differences in
the logits themselves). The hash is integer arithmetic, identical on CPU and GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["stream_key", "keyed_uniform", "KeyedGumbelSampler"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, the splitmix64 increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors; products wrap mod 2^64 like `_mix_int`."""
    x = (x ^ _shift_right(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right(x, 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key (as a signed int) naming one random stream, from any tuple of integers."""
    key = 0
    for part in parts:
        key = _mix_int(key + _GOLDEN + (part & _MASK64))
    return _signed(key)


def keyed_uniform(keys: Tensor, step: int, width: int) -> Tensor:
    """Uniform numbers in (0, 1), a pure function of (key, step, column).

    Args:
        keys: (R,) int64 stream keys.
        step: decoding step.
        width: columns `V`.
    Returns:
        (R, V) float64.
    """
    row = _mix(keys + _signed(_GOLDEN * (step + 1)))  # (R,)
    column = torch.arange(width, device=keys.device, dtype=torch.int64) * _signed(_GOLDEN)  # (V,)
    bits = _mix(row[:, None] ^ column[None, :])  # (R, V)
    return (_shift_right(bits, 11).double() + 0.5) * 2.0**-53


class KeyedGumbelSampler(LogitsProcessor):
    """Turns greedy decoding into keyed sampling: temperature, top-k, top-p, then Gumbel noise.

    Args:
        keys: (R,) int64 stream key of each generated row.
        prompt_width: input length at the first decoding step.
        temperature: > 0.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: nucleus mass; 1 keeps all.
    """

    def __init__(self, keys: Tensor, prompt_width: int, temperature: float, top_k: int, top_p: float) -> None:
        self.keys, self.prompt_width = keys, prompt_width
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """(R, L) ids so far and (R, V) next-token logits -> (R, V) perturbed logits for argmax."""
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        uniform = keyed_uniform(self.keys.to(scores.device), input_ids.shape[1] - self.prompt_width, scores.shape[1])
        gumbel = -torch.log(-torch.log(uniform))
        return (scores.double() + gumbel).to(scores.dtype)

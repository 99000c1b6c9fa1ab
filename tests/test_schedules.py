"""`WarmupDecay` against hand-computed factors, under a real optimizer and through a checkpoint."""

import math

import pytest
import torch

from renio_pl.errors import ConfigError
from renio_pl.schedules import WarmupDecay


def lrs(steps: int, lr: float = 1.0, **kwargs) -> list[float]:
    """The learning rate of each of `steps` optimizer steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = WarmupDecay(optimizer, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_linear_without_warmup_is_the_transformers_default():
    # 126 steps at 5e-6: step k uses 5e-6 (126 - k) / 126; step 125 uses 5e-6 / 126
    seen = lrs(126, lr=5e-6, total_steps=126)
    assert seen[0] == 5e-6 and seen[1] == pytest.approx(5e-6 * 125 / 126) and seen[125] == pytest.approx(5e-6 / 126)


def test_linear_warmup_then_decay():
    # T 10, w 4: [0, 1/4, 2/4, 3/4, then (10 - k) / 6 for k = 4..9]
    assert lrs(10, total_steps=10, warmup_steps=4) == pytest.approx(
        [0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_cosine_with_floor():
    # T 6, w 2, floor 0.1: [0, 0.5, then 0.1 + 0.9 (1 + cos(pi (k - 2) / 4)) / 2 for k = 2..5]
    expected = [0, 0.5] + [0.1 + 0.9 * (1 + math.cos(math.pi * (k - 2) / 4)) / 2 for k in range(2, 6)]
    assert lrs(6, total_steps=6, warmup_steps=2, shape="cosine", min_ratio=0.1) == pytest.approx(expected)
    assert expected[3] == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)


def test_resumes_from_its_state_dict():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = WarmupDecay(optimizer, total_steps=10, warmup_steps=4)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    fresh_optimizer = torch.optim.SGD([parameter], lr=1.0)
    fresh = WarmupDecay(fresh_optimizer, total_steps=10, warmup_steps=4)
    fresh.load_state_dict(state)
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(4 / 6)  # step 6


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 5, "warmup_steps": 5}, "warmup_steps < total_steps"),
    ({"total_steps": 5, "shape": "step"}, "shape must be linear or cosine"),
    ({"total_steps": 5, "min_ratio": 2.0}, "min_ratio must be in [0, 1]"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WarmupDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **kwargs)

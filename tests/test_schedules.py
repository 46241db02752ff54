import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.config import ConfigError
from lmforge.train.schedules import SCHEDULES


def make(name: str, warmup: int = 10, total: int = 100):
    return SCHEDULES.build(name, lr=1e-3, warmup_steps=warmup, max_steps=total, min_lr_ratio=0.1)


def test_cosine_warmup_and_floor():
    s = make("cosine")
    assert s(0) == pytest.approx(1e-4)  # linear warmup from 0: first step gets lr/warmup
    assert s(9) == pytest.approx(1e-3)
    assert s(55) == pytest.approx(0.55e-3)  # halfway through decay: midpoint of max and 10% floor
    assert s(100) == pytest.approx(1e-4) and s(1000) == pytest.approx(1e-4)


def test_linear_decay_midpoint():
    assert make("linear")(55) == pytest.approx(0.55e-3)


@given(st.sampled_from(["cosine", "linear"]), st.integers(0, 50), st.integers(51, 500))
def test_monotone_after_warmup_and_bounded(name: str, warmup: int, total: int):
    s = make(name, warmup, total)
    lrs = [s(i) for i in range(total + 5)]
    assert all(0 < lr <= 1e-3 + 1e-12 for lr in lrs[:warmup])
    after = lrs[warmup:]
    assert all(1e-4 - 1e-12 <= lr <= 1e-3 + 1e-12 for lr in after)
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:], strict=False))
    assert math.isclose(lrs[-1], 1e-4)


def test_unknown_schedule_lists_known():
    with pytest.raises(ConfigError, match="known: constant, cosine, linear"):
        SCHEDULES.get("wsdd")

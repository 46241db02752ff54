"""P2: every schedule at its key steps, in factors of the peak LR, and the schedule's clock in rows."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.config import ConfigError, ScheduleConfig
from lmforge.recipe import (
    choose_variant,
    load_config,  # noqa: F401  (registers the schedules)
)
from lmforge.train.schedules import SCHEDULES, build_schedule


def make(name: str, warmup: int = 10, total: int = 100, **options):
    cfg = choose_variant(ScheduleConfig, {"name": name, "warmup_steps": warmup, **options}, "train.schedule")
    return build_schedule(cfg, total)


def test_cosine_warmup_and_floor():
    s = make("cosine", min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)  # linear warmup from 0: the first step gets 1/warmup of the peak
    assert s(9) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.55)  # halfway through the decay: midpoint of the peak and the 10% floor
    assert s(100) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


def test_warmup_from_a_floor():
    s = make("cosine", warmup_from=0.2)
    assert s(0) == pytest.approx(0.2 + 0.8 * 0.1) and s(4) == pytest.approx(0.2 + 0.8 * 0.5) and s(9) == 1.0


def test_linear_decay_midpoint():
    assert make("linear", min_lr_ratio=0.1)(55) == pytest.approx(0.55)


def test_inverse_sqrt_after_warmup():
    s = make("inverse_sqrt", warmup=16, total=10_000)
    assert s(15) == 1.0
    assert s(63) == pytest.approx(math.sqrt(16 / 64)) and s(1599) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_in_the_last_fraction():
    s = make("wsd", warmup=10, total=110, decay_fraction=0.2)  # decay over the last 20 of 100 post-warmup steps
    assert s(10) == 1.0 and s(89) == 1.0
    assert s(100) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    sq = make("wsd", warmup=10, total=110, decay_fraction=0.2, decay_shape="sqrt", min_lr_ratio=0.1)
    assert sq(95) == pytest.approx(1 - 0.9 * math.sqrt(0.25))


def test_cyclic_cosine_restarts_at_each_cycle():
    s = make("cyclic_cosine", warmup=0, total=1000, cycle_steps=50, min_lr_ratio=0.0)
    assert s(0) == 1.0 and s(25) == pytest.approx(0.5) and s(50) == 1.0 and s(75) == pytest.approx(0.5)
    grow = make("cyclic_cosine", warmup=0, total=1000, cycle_steps=10, cycle_mult=2.0, min_lr_ratio=0.0)
    assert grow(10) == 1.0 and grow(20) == pytest.approx(0.5) and grow(30) == 1.0  # cycles of 10, 20, 40


@given(st.sampled_from(["cosine", "linear", "wsd"]), st.integers(0, 50), st.integers(51, 500))
def test_monotone_after_warmup_and_bounded(name: str, warmup: int, total: int):
    s = make(name, warmup, total, min_lr_ratio=0.1)
    lrs = [s(i) for i in range(total + 5)]
    assert all(0 < lr <= 1 + 1e-12 for lr in lrs[:warmup])
    after = lrs[warmup:]
    assert all(0.1 - 1e-12 <= lr <= 1 + 1e-12 for lr in after)
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:], strict=False))
    assert math.isclose(lrs[-1], 0.1)


def test_unknown_schedule_lists_known():
    with pytest.raises(ConfigError, match="known: constant, cosine, cyclic_cosine, inverse_sqrt, linear, wsd"):
        SCHEDULES.get("wsdd")

"""P2: learning-rate schedules by name, each with its own config under `train.schedule`.

A schedule is a pure function of training progress `s`, measured in full-batch steps of tokens
(tokens seen / tokens per full step), so resuming needs no scheduler state and a batch ramp
(smaller early steps) keeps the schedule's shape in tokens. It returns a factor of the peak: the
trainer multiplies each parameter group's own peak learning rate by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.config import ScheduleConfig, check
from lmforge.registry import Registry

SCHEDULES = Registry("schedule", config_base=ScheduleConfig)


class Schedule:
    """Linear warmup from `warmup_from` to 1 over the first warmup_steps, then `decay(s)` until
    max_steps (held at its end value after)."""

    def __init__(self, cfg: ScheduleConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps
        self.warmup, self.floor = cfg.warmup_steps, cfg.min_lr_ratio

    def __call__(self, s: float) -> float:
        """Factor of the peak LR for the step that starts at progress `s` (0-based, in full steps)."""
        if s < self.warmup:
            start = self.cfg.warmup_from
            return start + (1.0 - start) * min(1.0, (s + 1) / self.warmup)
        return self.decay(min(s, self.max_steps))

    def progress(self, s: float) -> float:
        """Fraction of the post-warmup span done at `s`, in [0, 1]."""
        return min(1.0, (s - self.warmup) / max(1, self.max_steps - self.warmup))

    def decay(self, s: float) -> float:
        raise NotImplementedError


@SCHEDULES.register("cosine", config=ScheduleConfig)
class Cosine(Schedule):
    def decay(self, s: float) -> float:
        return self.floor + 0.5 * (1.0 - self.floor) * (1 + math.cos(math.pi * self.progress(s)))


@dataclass
class LinearConfig(ScheduleConfig):
    name: str = "linear"


@SCHEDULES.register("linear", config=LinearConfig)
class Linear(Schedule):
    def decay(self, s: float) -> float:
        return 1.0 - (1.0 - self.floor) * self.progress(s)


@dataclass
class ConstantConfig(ScheduleConfig):
    name: str = "constant"


@SCHEDULES.register("constant", config=ConstantConfig)
class Constant(Schedule):
    def decay(self, s: float) -> float:
        return 1.0


@dataclass
class InverseSqrtConfig(ScheduleConfig):
    """T5 / original Transformer: after warmup the LR falls as 1/sqrt(step), floored at min_lr_ratio."""

    name: str = "inverse_sqrt"
    min_lr_ratio: float = 0.0


@SCHEDULES.register("inverse_sqrt", config=InverseSqrtConfig)
class InverseSqrt(Schedule):
    def decay(self, s: float) -> float:
        return max(self.floor, math.sqrt(max(self.warmup, 1) / max(s + 1, 1.0)))


@dataclass
class WSDConfig(ScheduleConfig):
    """Warmup-stable-decay (MiniCPM): the peak held until the last `decay_fraction` of the run,
    then a decay to the floor, `linear` or `sqrt` (1 - sqrt(progress)) or `cosine`."""

    name: str = "wsd"
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "decay_fraction", 0.0 < self.decay_fraction <= 1.0, "must be in (0, 1]", self.decay_fraction)
        check(where, "decay_shape", self.decay_shape in ("linear", "sqrt", "cosine"),
              "must be linear, sqrt or cosine", self.decay_shape)


@SCHEDULES.register("wsd", config=WSDConfig)
class WSD(Schedule):
    def decay(self, s: float) -> float:
        cfg: WSDConfig = self.cfg  # type: ignore[assignment]
        start = self.max_steps - cfg.decay_fraction * (self.max_steps - self.warmup)
        if s < start:
            return 1.0
        x = min(1.0, (s - start) / max(self.max_steps - start, 1e-9))
        shape = {"linear": x, "sqrt": math.sqrt(x), "cosine": 0.5 * (1 - math.cos(math.pi * x))}[cfg.decay_shape]
        return 1.0 - (1.0 - self.floor) * shape


@dataclass
class CyclicCosineConfig(ScheduleConfig):
    """Cosine with warm restarts (SGDR): after warmup, cycles of `cycle_steps` full steps, each
    `cycle_mult` times longer than the last, each decaying from the peak to the floor."""

    name: str = "cyclic_cosine"
    cycle_steps: int = 100
    cycle_mult: float = 1.0

    def validate(self, where: str) -> None:
        super().validate(where)
        check(where, "cycle_steps", self.cycle_steps > 0, "must be > 0", self.cycle_steps)
        check(where, "cycle_mult", self.cycle_mult >= 1.0, "must be >= 1", self.cycle_mult)


@SCHEDULES.register("cyclic_cosine", config=CyclicCosineConfig)
class CyclicCosine(Schedule):
    def decay(self, s: float) -> float:
        cfg: CyclicCosineConfig = self.cfg  # type: ignore[assignment]
        t, length = s - self.warmup, float(cfg.cycle_steps)
        if cfg.cycle_mult == 1.0:
            t %= length
        while t >= length:  # growing cycles: at most log_mult(s / cycle_steps) rounds
            t -= length
            length *= cfg.cycle_mult
        return self.floor + 0.5 * (1.0 - self.floor) * (1 + math.cos(math.pi * t / length))


def build_schedule(cfg: ScheduleConfig, max_steps: int) -> Schedule:
    return SCHEDULES.get(cfg.name, "train.schedule.name")(cfg, max_steps)

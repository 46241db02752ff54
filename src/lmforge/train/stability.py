"""P4: loss-spike and NaN detection with rollback, after PaLM §5.1 (Chowdhery et al., 2022).

PaLM saw loss spikes that came from particular batches meeting a particular model state; it
restarted "from a checkpoint roughly 100 steps before the spike started" and skipped "roughly
200-500 data batches". Here:

- `detect` judges a step before its optimizer update from its loss and gradient norm alone: a
  non-finite value, or a z-score above the threshold over the last `window` good steps. It is a pure
  function of numbers that are logged and checkpointed, and (the loss all-reduced, the norm global)
  identical on every rank, so every rank takes the same decision and a resumed run repeats it.
- `rollback_order` picks the checkpoint: the newest at least `rewind_steps` before the spike, else
  the oldest one before it (the nearest to that target). Pruning keeps one that far back.
- The trainer then skips `skip_batches` global batches from the restored loader position, and at
  least every batch drawn up to and including the spike, so a repeat of the spike's batches is
  impossible even on the second rollback to the same checkpoint.
- Fault injection (`train.fault_injection`) multiplies the loss by a factor, or makes it NaN, at
  chosen steps, once per run: the fired injections are kept through rollbacks and in checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from lmforge.config import FaultInjectionConfig, StabilityConfig


class SpikeDetected(Exception):
    """Raised by the trainer before the optimizer step of a spike; `fit` rolls back."""

    def __init__(self, step: int, reason: str, loss: float, grad_norm: float):
        super().__init__(f"{reason} at step {step}")
        self.step, self.reason, self.loss, self.grad_norm = step, reason, loss, grad_norm


def zscore(value: float, recent: Sequence[float], min_rel_std: float) -> float:
    """(value - mean) / std over `recent`, the std floored at `min_rel_std` x |mean|: on a plateau
    the std is tiny and an ordinary wiggle would score as a spike."""
    mean = statistics.fmean(recent)
    std = max(statistics.pstdev(recent, mean), min_rel_std * abs(mean), 1e-12)
    return (value - mean) / std


def detect(history: Sequence[tuple[float, float]], loss: float, grad_norm: float, cfg: StabilityConfig) -> str | None:
    """Why this step is a spike, or None. `history`: (loss, grad_norm) of the previous good steps."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    recent = list(history)[-cfg.window:]
    if len(recent) < cfg.min_steps:
        return None
    judged = [("loss", loss, 0, cfg.z_threshold), ("gradient norm", grad_norm, 1, cfg.grad_z_threshold)]
    for name, value, column, threshold in judged:
        z = zscore(value, [h[column] for h in recent], cfg.min_rel_std)
        if threshold > 0 and z > threshold:
            return f"{name} {value:.4g} is {z:.1f} standard deviations above the mean of the last {len(recent)} steps"
    return None


def rollback_order(steps: Iterable[int], spike_step: int, rewind_steps: int) -> list[int]:
    """Checkpoint steps to try, best first: those at least `rewind_steps` before the spike, newest
    first; then the ones nearer the spike, oldest (nearest the target) first."""
    before = sorted(s for s in steps if s < spike_step)
    far = [s for s in before if s <= spike_step - rewind_steps]
    near = [s for s in before if s > spike_step - rewind_steps]
    return far[::-1] + near


def injection(cfg: FaultInjectionConfig, step: int, fired: set[str]) -> tuple[float, str | None]:
    """The loss factor for `step` and the injection's name, if one is due and has not fired yet."""
    for kind, steps, factor in (("nan", cfg.nan_at, math.nan), ("spike", cfg.spike_at, cfg.spike_scale)):
        name = f"{kind}@{step}"
        if step in steps and name not in fired:
            return factor, name
    return 1.0, None


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """Sorted distinct ids as inclusive [first, last] runs: skipped sample ids are mostly consecutive."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


class StabilityState:
    """What the detector remembers, saved with every checkpoint: the recent good steps, the rollbacks
    (in all, and `pending`: since the last checkpoint past a spike, which max_rollbacks bounds) and
    the fault injections that fired."""

    def __init__(self, window: int):
        self.history: deque[tuple[float, float]] = deque(maxlen=window)
        self.rollbacks = self.pending = self.last_spike = 0
        self.fired: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "rollbacks": self.rollbacks, "pending": self.pending,
                "last_spike": self.last_spike, "fired": sorted(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend((float(a), float(b)) for a, b in state.get("history", []))
        self.rollbacks, self.pending = int(state.get("rollbacks", 0)), int(state.get("pending", 0))
        self.last_spike = int(state.get("last_spike", 0))
        self.fired = set(state.get("fired", []))

    def rolled_back(self, before: dict[str, Any], spike_step: int) -> None:
        """After restoring a checkpoint: its history stays; counters and fired injections carry over."""
        self.load_state_dict({**before, "history": self.state_dict()["history"]})
        self.rollbacks, self.pending = self.rollbacks + 1, self.pending + 1
        self.last_spike = max(self.last_spike, spike_step)

    def saved(self, step: int) -> None:
        if step > self.last_spike:  # training got past the last spike: a later one gets its own retries
            self.pending = 0

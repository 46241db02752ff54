"""T3: mixture weights per source, by tokens.

A weight is the share of training tokens drawn from a source (not of documents: a source of long
documents would otherwise be under-sampled). Without explicit weights, temperature sampling draws a
source with probability p ∝ n^(1/T) for n tokens (T = 1: natural proportions; larger T flattens
towards uniform, as multilingual models up-sample small languages).
"""

from __future__ import annotations

import math
import warnings

from lmforge.errors import ConfigError


def resolve_weights(
    sizes: dict[str, int], weights: dict[str, float], temperature: float = 1.0, where: str = "tokens.mixture"
) -> dict[str, float]:
    """Normalised weights for the sources in `sizes` (tokens per source). Explicit `weights` name
    sources that must exist with data; sources they leave out get weight 0; weights that do not sum
    to 1 are normalised with a warning; a negative weight is an error."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ConfigError(f"{where}.temperature: must be > 0 (got {temperature!r})")
    if not weights:
        raw = {s: n ** (1.0 / temperature) for s, n in sizes.items() if n > 0}
    else:
        for name, w in weights.items():
            if name not in sizes:
                raise ConfigError(f"{where}.weights.{name}: no such source; the token sets have {sorted(sizes)}")
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise ConfigError(f"{where}.weights.{name}: must be a number >= 0 (got {w!r})")
            if w > 0 and sizes[name] == 0:
                raise ConfigError(f"{where}.weights.{name}: the source has no tokens in this split")
        raw = {s: float(w) for s, w in weights.items() if w > 0}
        total = sum(raw.values())
        if raw and abs(total - 1.0) > 1e-6:
            warnings.warn(f"{where}.weights sum to {total:g}, not 1; normalised", stacklevel=2)
    total = sum(raw.values())
    if not raw or total <= 0:
        raise ConfigError(f"{where}: no source with tokens and a positive weight (sources: {sizes})")
    return {s: w / total for s, w in sorted(raw.items())}


class SmoothRoundRobin:
    """Deterministic interleaving by weight (nginx's smooth weighted round-robin): each draw adds
    every weight to its source's credit and picks the highest credit, which then pays 1. Every
    prefix of the sequence holds each source within about one draw of its share (under two: tested);
    ties go to the first name. `credits` is plain data, saved with the loader state."""

    def __init__(self, weights: dict[str, float], credits: dict[str, float] | None = None):
        self.names = [n for n in sorted(weights) if weights[n] > 0]
        self.weights = weights
        self.credits = credits if credits is not None else {}

    def choose(self) -> str:
        for name in self.names:
            self.credits[name] = self.credits.get(name, 0.0) + self.weights[name]
        best = max(self.names, key=lambda n: (self.credits[n], -self.names.index(n)))
        self.credits[best] -= 1.0
        return best

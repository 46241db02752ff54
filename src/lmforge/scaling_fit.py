"""The scaling-law fit: L(N, D) = E + A/N^alpha + B/D^beta over finished runs (scaling.py runs them).

The fit is Hoffmann et al. (2022)'s: a Huber loss (delta 1e-3) between log L and
log(E + A/N^alpha + B/D^beta) written as a log-sum-exp, minimised by L-BFGS from the best few points
of a grid of initialisations. log N and log D are centred first, so A and alpha are not fit as two
nearly collinear numbers. Everything is float64 and seeded: the same runs give the same fit.

The compute-optimal frontier minimises L over N at fixed C = 6·N·D with D = C/(6N), whose closed form is
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G, G = (alpha A/(beta B))^(1/(alpha+beta)).
A prediction's interval is the 5-95% range of the prediction over fits to runs resampled with replacement.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.config import ConfigError

N_FIT_PARAMS = 5  # E, A, B, alpha, beta
MIN_RUNS = N_FIT_PARAMS + 1  # one more than the parameters, so a misfit can show at all
HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class ScalingPoint:
    """One finished run: N non-embedding parameters trained on D tokens reached validation loss L."""

    name: str
    params: int
    tokens: int
    loss: float
    run_dir: str = ""

    @property
    def compute(self) -> float:
        return 6.0 * self.params * self.tokens


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # mean Huber loss over the runs at the optimum (in units of delta)
    n_runs: int

    def loss(self, params: Any, tokens: Any) -> Any:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def compute_optimal(self, compute: Any) -> tuple[Any, Any, Any]:
        """(N_opt, D_opt, L_opt) at compute C, from the closed form (this module's docstring)."""
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"no compute-optimal frontier: the fit's exponents must be > 0 "
                             f"(alpha {self.alpha:.3g}, beta {self.beta:.3g})")
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * np.power(np.asarray(compute, dtype=float) / 6, self.beta / s)
        d = np.asarray(compute, dtype=float) / (6 * n)
        return n, d, self.loss(n, d)


# ---------------------------------------------------------------------------- the fit


def _objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Huber loss per parameter row of theta (..., 5) = (a, b, e, alpha, beta) in centred logs."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack([a[..., None] - alpha[..., None] * x[0], b[..., None] - beta[..., None] * x[1],
                         e[..., None].expand(*e.shape, x.shape[1])])
    pred = torch.logsumexp(terms, 0)
    huber = torch.nn.functional.huber_loss(pred, y.expand_as(pred), delta=HUBER_DELTA, reduction="none")
    return huber.mean(-1) / HUBER_DELTA  # scaled to order 1, where L-BFGS's tolerances are meant to work


def _grid() -> torch.Tensor:
    """Initialisations: a, b are the logs of each reducible term at the mean N or D."""
    axes = (np.linspace(-4, 2, 7), np.linspace(-4, 2, 7), np.linspace(-1, 2, 7), np.linspace(0, 2, 5),
            np.linspace(0, 2, 5))
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.float64)


def _lbfgs(theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=1000, tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = _objective(theta, x, y)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return theta.detach(), float(_objective(theta, x, y))


def check_runs(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> None:
    """Refuse data the five parameters cannot be fit to, saying what is missing."""
    n = len(losses)
    if n < MIN_RUNS:
        raise ConfigError(f"a scaling fit has {N_FIT_PARAMS} parameters (E, A, B, alpha, beta) and needs at least "
                          f"{MIN_RUNS} finished runs; got {n} (e.g. 3 sizes x 2 token budgets)")
    if not len(params) == len(tokens) == n:
        raise ValueError(f"params, tokens and losses differ in length ({len(params)}, {len(tokens)}, {n})")
    values = np.asarray([*params, *tokens, *losses], dtype=float)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError("every run's parameters, tokens and loss must be finite and > 0")
    if len(set(params)) < 2 or len(set(tokens)) < 2:
        raise ConfigError(f"a scaling fit needs at least 2 model sizes and 2 token budgets; got {len(set(params))} "
                          f"size(s) and {len(set(tokens))} budget(s)")


def fit_scaling_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                    starts: int = 8, init: ScalingFit | None = None) -> ScalingFit:
    """Fit E + A/N^alpha + B/D^beta to runs; L-BFGS from the `starts` best grid points (or from `init`)."""
    check_runs(params, tokens, losses)
    logs = torch.tensor(np.log(np.asarray([params, tokens], dtype=float)), dtype=torch.float64)
    centre = logs.mean(1)
    x, y = logs - centre[:, None], torch.tensor(np.log(np.asarray(losses, dtype=float)), dtype=torch.float64)
    if init is None:
        grid = _grid()
        inits = grid[torch.argsort(_objective(grid, x, y))[:starts]]
    else:
        inits = torch.tensor([[math.log(init.A) - init.alpha * centre[0], math.log(init.B) - init.beta * centre[1],
                               math.log(init.E), init.alpha, init.beta]], dtype=torch.float64)
    theta, value = min((_lbfgs(t, x, y) for t in inits), key=lambda r: r[1])  # ties: the first start wins
    a, b, e, alpha, beta = theta.tolist()
    return ScalingFit(E=math.exp(e), A=math.exp(a + alpha * float(centre[0])), B=math.exp(b + beta * float(centre[1])),
                      alpha=alpha, beta=beta, objective=value, n_runs=len(losses))


def bootstrap_fits(points: Sequence[ScalingPoint], fit: ScalingFit, n_boot: int = 200,
                   seed: int = 0) -> list[ScalingFit]:
    """Fits to `n_boot` resamples of the runs (with replacement), each started from the full fit.
    Resamples left with one size or one budget cannot be fit and are dropped."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n_boot):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        if len({p.params for p in sample}) < 2 or len({p.tokens for p in sample}) < 2:
            continue
        fits.append(fit_scaling_law([p.params for p in sample], [p.tokens for p in sample],
                                    [p.loss for p in sample], init=fit))
    return fits


def predict(fit: ScalingFit, boots: Sequence[ScalingFit], params: float, tokens: float,
            level: tuple[float, float] = (5.0, 95.0)) -> dict[str, Any]:
    """The fit's loss at (N, D), with the `level` percentiles of the bootstrap fits' predictions."""
    spread = [float(b.loss(params, tokens)) for b in boots]
    interval = [float(v) for v in np.percentile(spread, level)] if spread else None
    return {"params": int(params), "tokens": int(tokens), "compute": 6.0 * params * tokens,
            "loss": float(fit.loss(params, tokens)), "interval": interval, "level": list(level),
            "n_bootstrap": len(spread)}

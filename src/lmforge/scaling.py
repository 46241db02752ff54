"""E5: scaling laws. Train small models over a grid of sizes and token budgets (or read finished runs),
fit L(N, D) = E + A/N^alpha + B/D^beta (scaling_fit.py), and predict a larger run's loss with a
bootstrap interval.

N is the model's non-embedding parameter count (Kaplan et al. 2020): at the sizes a sweep can afford,
the token embedding and output projection are most of the parameters but add little capacity, and
counting them bends the small end of the curve. D is the tokens the run trained on (metrics.jsonl),
L its validation loss (eval.json, nats/token), and compute C = 6·N·D.

Outputs in `<out_dir>/scaling/` (or --out): scaling.json (runs, fit, bootstrap, frontier, prediction)
and scaling.png (loss against compute with the fitted curves and the frontier; N_opt against compute).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import ConfigError, ModelConfig, RunConfig
from lmforge.io_utils import atomic_write_json
from lmforge.recipe import parse_override
from lmforge.scaling_fit import (
    MIN_RUNS,
    N_FIT_PARAMS,
    ScalingFit,
    ScalingPoint,
    bootstrap_fits,
    fit_scaling_law,
    predict,
)
from lmforge.sweep import SweepRun, prepare_shared, run_sweep

DEFAULT_SIZES = "32:1,64:2,96:3"
DEFAULT_TOKENS = "100k,200k,400k"
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


# ---------------------------------------------------------------------------- sizes, budgets and runs


def parse_count(text: str, what: str = "count") -> float:
    """'300k', '1.5M', '2e9', '7B' -> a number (k, M, B, T; case ignored)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmbt]?)\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{what}: expected a positive number like 300k, 1.5M or 2e9 (got {text!r})")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def format_count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def non_embedding_params(model: ModelConfig) -> int:
    """N of the scaling law, counted on the meta device (nothing allocated). The count leaves out the
    vocabulary-sized tables, so a config whose vocab is still 0 (the tokenizer's) is counted with a stand-in."""
    from lmforge.models import build_model, count_params

    sized = dataclasses.replace(model, vocab_size=model.vocab_size or 256)
    return count_params(build_model(sized, init=False), non_embedding=True)


def _shape(model: ModelConfig, d_model: int, n_layers: int, n_heads: int | None = None) -> ModelConfig:
    if not all(hasattr(model, k) for k in ("d_model", "n_layers", "n_heads")):
        raise ConfigError(f"--sizes: model.arch {model.arch!r} has no d_model / n_layers / n_heads to scale")
    heads = n_heads or max(1, d_model // 32)  # 32-wide heads: a common choice at these widths
    if d_model % heads:
        raise ConfigError(f"--sizes: {d_model} is not a multiple of {heads} heads: give d_model:n_layers:n_heads")
    return dataclasses.replace(model, d_model=d_model, n_layers=n_layers, n_heads=heads)


def shape_for_params(target: float, model: ModelConfig) -> ModelConfig:
    """A shape with about `target` non-embedding parameters: d_model near 64 per layer (Kaplan et al. found
    loss nearly flat across such aspect ratios), width in steps of 32 closest to the target on a log scale."""
    layers = max(1, round((target / (12 * 64**2)) ** (1 / 3)))  # a SwiGLU block holds about 12 d_model^2
    guess = math.sqrt(target / (12 * layers))
    widths = sorted({max(32, 32 * round(guess * f / 32)) for f in (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4)})
    shapes = [_shape(model, d, layers) for d in widths]
    return min(shapes, key=lambda s: abs(math.log(non_embedding_params(s) / target)))


def parse_sizes(spec: str, model: ModelConfig) -> list[ModelConfig]:
    """'64:2,128:4:4' (d_model:n_layers[:n_heads]) or parameter targets '100k,1M' (or both), in order."""
    shapes = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        bad = ConfigError(f"--sizes: expected d_model:n_layers[:n_heads] or a parameter count like 1M (got {item!r})")
        parts = item.split(":")
        if len(parts) == 1:
            try:
                target = parse_count(item)
            except ConfigError:
                raise bad from None
            shapes.append(shape_for_params(target, model))
        elif len(parts) in (2, 3) and all(p.isdigit() and int(p) > 0 for p in parts):
            shapes.append(_shape(model, *map(int, parts)))
        else:
            raise bad
    return shapes


def sweep_defaults(cfg: RunConfig) -> dict[str, Any]:
    """Small-run settings; keys the user sets on the command line win (see `cli_main`). One batch shape
    for every run, so a budget is a number of steps."""
    return {"train.seq_len": min(128, cfg.model.max_seq_len), "train.batch_size": 16, "train.grad_accum": 1,
            "train.batch_tokens": 0, "train.schedule.warmup_steps": 10, "eval.generate.max_new_tokens": 8}


def plan_runs(cfg: RunConfig, shapes: Sequence[ModelConfig], budgets: Sequence[float],
              defaults: dict[str, Any]) -> list[SweepRun]:
    """One run per (shape, budget). The LR schedule ends at each run's own budget (Hoffmann et al.: a
    cosine cut short overstates the loss), so every budget is a separate run, not a checkpoint of a longer one."""
    if len(shapes) * len(budgets) < MIN_RUNS or len(shapes) < 2 or len(budgets) < 2:
        raise ConfigError(f"a scaling fit has {N_FIT_PARAMS} parameters and needs at least {MIN_RUNS} runs over "
                          f">= 2 sizes and >= 2 token budgets; {len(shapes)} size(s) x {len(budgets)} budget(s) "
                          f"make {len(shapes) * len(budgets)}")
    setting, tc = defaults.get, cfg.train
    per_step = setting("train.batch_tokens", tc.batch_tokens) or (
        setting("train.seq_len", tc.seq_len) * setting("train.batch_size", tc.batch_size)
        * setting("train.grad_accum", tc.grad_accum))
    warmup = setting("train.schedule.warmup_steps", tc.schedule.warmup_steps)
    runs = []
    for shape, budget in itertools.product(shapes, budgets):
        steps = max(1, round(budget / per_step))
        name = f"d{shape.d_model}-l{shape.n_layers}-h{shape.n_heads}-t{format_count(budget)}"
        runs.append(SweepRun(name, {**defaults, "model.d_model": shape.d_model, "model.n_layers": shape.n_layers,
                                    "model.n_heads": shape.n_heads, "train.max_steps": steps,
                                    "train.checkpoint_every": steps,  # one checkpoint: resumed only when killed
                                    "train.schedule.warmup_steps": min(warmup, steps // 4)}))
    return runs


def find_run_dirs(roots: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding eval.json): each root itself, else its children and its sweep/'s children."""
    found: list[Path] = []
    for root in map(Path, roots):
        if (root / "eval.json").is_file():
            found.append(root)
        elif root.is_dir():
            found += sorted(p.parent for sub in (root, root / "sweep") for p in sub.glob("*/eval.json"))
        else:
            raise FileNotFoundError(f"--runs-from: {root} is not a directory")
    if not found:
        where = ", ".join(map(str, roots))
        raise FileNotFoundError(f"--runs-from: no finished run (a directory with eval.json) in {where}")
    return list(dict.fromkeys(found))


def read_run(run_dir: Path) -> ScalingPoint:
    """A finished run's point: loss from eval.json, tokens from the last metrics.jsonl record, N from the
    config train saved (config.yaml, vocabulary resolved) or else the run's recipe.yaml."""
    from lmforge.recipe import load_config
    from lmforge.train.metrics import MetricsLog

    records = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if "tokens" in r]
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no training records, so no token count for this run")
    config = next((p for p in (run_dir / "config.yaml", run_dir / "recipe.yaml") if p.is_file()), None)
    if config is None:
        raise FileNotFoundError(f"{run_dir}: no config.yaml or recipe.yaml, so no model size for this run")
    loss = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))["loss"]
    return ScalingPoint(run_dir.name, non_embedding_params(load_config(config).model), int(records[-1]["tokens"]),
                        float(loss), str(run_dir))


# ---------------------------------------------------------------------------- the command


def run_scaling_sweep(cfg: RunConfig, sizes: str, tokens: str, defaults: dict[str, Any], workers: int = 1,
                      progress: bool = True) -> list[ScalingPoint]:
    """Train (or read back) every size x budget through the sweep runner; the finished runs' points."""
    budgets = [parse_count(t, "--tokens") for t in tokens.split(",") if t.strip()]
    runs = plan_runs(cfg, parse_sizes(sizes, cfg.model), budgets, defaults)  # refuses too few runs before training
    prepare_shared(cfg, progress)
    results = run_sweep(cfg, runs, workers=workers, progress=progress)
    return [read_run(Path(r.run_dir)) for r in results if r.ok]


def frontier(fit: ScalingFit, computes: Sequence[float]) -> list[dict[str, float]]:
    n, d, loss = fit.compute_optimal(np.asarray(computes, dtype=float))
    return [{"compute": float(c), "params": float(p), "tokens": float(t), "loss": float(v)}
            for c, p, t, v in zip(computes, n, d, loss, strict=True)]


def scaling_law(
    cfg: RunConfig,
    sizes: str | None = None,
    tokens: str | None = None,
    runs_from: Sequence[str | Path] | None = None,
    predict_at: tuple[float, float] | None = None,
    out: str | Path | None = None,
    n_boot: int = 200,
    defaults: dict[str, Any] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Sweep (or read `runs_from`), fit, predict; returns what scaling.json holds plus "table".
    `predict_at`: (N, D); None predicts the compute-optimal run at 10x the largest run's compute."""
    if runs_from and (sizes or tokens):
        raise ConfigError("--runs-from reads finished runs: give it without --sizes and --tokens")
    if runs_from:
        points = [read_run(d) for d in find_run_dirs(runs_from)]
    else:
        points = run_scaling_sweep(cfg, sizes or DEFAULT_SIZES, tokens or DEFAULT_TOKENS,
                                   sweep_defaults(cfg) if defaults is None else defaults, workers, progress)
    points = sorted(points, key=lambda p: (p.params, p.tokens, p.name))  # the fit must not depend on run order
    fit = fit_scaling_law([p.params for p in points], [p.tokens for p in points], [p.loss for p in points])
    boots = bootstrap_fits(points, fit, n_boot, seed=cfg.seed)
    top, optimal = max(p.compute for p in points), fit.alpha > 0 and fit.beta > 0
    if predict_at is None and optimal:
        n_opt, d_opt, _ = fit.compute_optimal(10 * top)
        predict_at = (float(n_opt), float(d_opt))
    elif predict_at is None:  # no frontier to follow: scale the largest run's N and D alike to 10x compute
        largest = max(points, key=lambda p: p.compute)
        predict_at = (largest.params * 10**0.5, largest.tokens * 10**0.5)
    prediction = predict(fit, boots, *predict_at)
    computes = np.geomspace(min(p.compute for p in points) / 2, max(top, prediction["compute"]) * 2, 25)
    result = {
        "params_counted": "non-embedding (count_params(model, non_embedding=True))", "compute": "6 * N * D",
        "runs": [{**dataclasses.asdict(p), "compute": p.compute, "fitted_loss": float(fit.loss(p.params, p.tokens))}
                 for p in points],
        "fit": dataclasses.asdict(fit), "bootstrap": _bootstrap_summary(boots, n_boot),
        "frontier": frontier(fit, computes.tolist()) if optimal else [],
        "prediction": prediction,
    }
    return _write_outputs(Path(out) if out else cfg.out / "scaling", result, points, fit)


def _bootstrap_summary(boots: Sequence[ScalingFit], n_boot: int) -> dict[str, Any]:
    names = ("E", "A", "B", "alpha", "beta")
    quantiles = {k: [float(v) for v in np.percentile([getattr(b, k) for b in boots], (5, 50, 95))]
                 for k in names} if boots else {}
    return {"resamples": n_boot, "fitted": len(boots), "percentiles": [5, 50, 95], "params": quantiles}


def _write_outputs(out_dir: Path, result: dict[str, Any], points: Sequence[ScalingPoint],
                   fit: ScalingFit) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["paths"] = {"json": str(out_dir / "scaling.json"), "plot": str(out_dir / "scaling.png")}
    plot_scaling(points, fit, result["prediction"], out_dir / "scaling.png")
    atomic_write_json(out_dir / "scaling.json", result)
    result["table"] = format_report(result)
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'run':<28}{'N (non-emb)':>12}{'D tokens':>10}{'C=6ND':>10}{'val loss':>10}{'fit':>9}"]
    for r in result["runs"]:
        lines.append(f"{r['name']:<28}{format_count(r['params']):>12}{format_count(r['tokens']):>10}"
                     f"{r['compute']:>10.2e}{r['loss']:>10.4f}{r['fitted_loss']:>9.4f}")
    f, q = result["fit"], result["bootstrap"]["params"]
    lines.append(f"fit: L = {f['E']:.4g} + {f['A']:.4g}/N^{f['alpha']:.4f} + {f['B']:.4g}/D^{f['beta']:.4f} "
                 f"({f['n_runs']} runs)")
    if q:
        lines.append(f"bootstrap 5-95%: alpha {q['alpha'][0]:.3f}-{q['alpha'][2]:.3f}, "
                     f"beta {q['beta'][0]:.3f}-{q['beta'][2]:.3f}, E {q['E'][0]:.3f}-{q['E'][2]:.3f}")
    p = result["prediction"]
    interval = f" (5-95%: {p['interval'][0]:.4f}-{p['interval'][1]:.4f})" if p["interval"] else ""
    lines.append(f"prediction: N {format_count(p['params'])}, D {format_count(p['tokens'])}, C {p['compute']:.2e}: "
                 f"loss {p['loss']:.4f}{interval}")
    return "\n".join(lines)


def plot_scaling(points: Sequence[ScalingPoint], fit: ScalingFit, prediction: dict[str, Any], path: Path) -> Path:
    """Left: loss against compute, each size's runs and fitted curve, the frontier and the prediction.
    Right: the compute-optimal N against compute, with the runs' N. Figure + Agg canvas, not pyplot's
    state, so the library never switches the caller's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmforge.plots import save_figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_n = fig.subplots(1, 2)
    sizes = sorted({p.params for p in points})
    top = max(max(p.compute for p in points), prediction["compute"])
    for i, n in enumerate(sizes):
        mine = [p for p in points if p.params == n]
        color = f"C{i % 10}"
        ax_loss.scatter([p.compute for p in mine], [p.loss for p in mine], color=color, label=f"N {format_count(n)}")
        d = np.geomspace(min(p.tokens for p in mine) / 2, max(p.tokens for p in mine) * 2, 50)
        ax_loss.plot(6 * n * d, fit.loss(n, d), color=color, lw=0.8)
        ax_n.scatter([p.compute for p in mine], [n] * len(mine), color=color)
    if fit.alpha > 0 and fit.beta > 0:
        c = np.geomspace(min(p.compute for p in points) / 2, top * 2, 100)
        n_opt, _, l_opt = fit.compute_optimal(c)
        ax_loss.plot(c, l_opt, "k--", lw=1.2, label="compute-optimal")
        ax_n.plot(c, n_opt, "k--", lw=1.2, label="N_opt(C)")
    low, high = prediction["interval"] or (prediction["loss"], prediction["loss"])
    ax_loss.errorbar([prediction["compute"]], [prediction["loss"]], color="k", marker="*", ms=10, capsize=4,
                     yerr=[[prediction["loss"] - low], [high - prediction["loss"]]], label="prediction (5-95%)")
    ax_n.scatter([prediction["compute"]], [prediction["params"]], color="k", marker="*", s=80)
    ax_loss.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats/token)",
                title=f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
    ax_n.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="non-embedding parameters N",
             title="compute-optimal model size")
    for ax in (ax_loss, ax_n):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def add_cli_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--sizes", help=f"d_model:n_layers[:n_heads] or parameter targets, comma-separated "
                                    f"(default {DEFAULT_SIZES})")
    sp.add_argument("--tokens", help=f"training token budgets, comma-separated (default {DEFAULT_TOKENS})")
    sp.add_argument("--runs-from", nargs="+", metavar="DIR",
                    help="fit finished runs (directories with eval.json, or folders of them) instead of training")
    sp.add_argument("--predict", metavar="N:D", help="predict the loss of N non-embedding parameters on D tokens, "
                                                     "e.g. 10M:200M (default: compute-optimal at 10x the sweep)")
    sp.add_argument("--out", help="directory for scaling.json and scaling.png (default <out_dir>/scaling)")
    sp.add_argument("--bootstrap", type=int, default=200, help="resamples for the prediction's interval (default 200)")
    sp.add_argument("--workers", type=int, default=1, help="runs trained at once, one process each (default 1)")
    sp.add_argument("--no-sweep-defaults", action="store_true", help="train runs with the recipe's own settings")


def parse_predict(spec: str) -> tuple[float, float]:
    parts = spec.split(":")
    if len(parts) != 2:
        raise ConfigError(f"--predict: expected N:D, e.g. 10M:200M (got {spec!r})")
    return parse_count(parts[0], "--predict N"), parse_count(parts[1], "--predict D")


def cli_main(args: argparse.Namespace, cfg: RunConfig, progress: bool) -> int:
    defaults: dict[str, Any] = {} if args.no_sweep_defaults else sweep_defaults(cfg)
    # A key given on the command line is the user's choice for every run: drop the default.
    given = [parse_override(o)[0] for o in args.overrides]
    defaults = {k: v for k, v in defaults.items() if not any(k == g or k.startswith(f"{g}.") for g in given)}
    result = scaling_law(cfg, args.sizes, args.tokens, args.runs_from,
                         parse_predict(args.predict) if args.predict else None, args.out, args.bootstrap, defaults,
                         args.workers, progress)
    print(result["table"])
    print(f"wrote {result['paths']['json']} and {result['paths']['plot']}", file=sys.stderr)
    return 0

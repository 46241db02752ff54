"""T6: mixture search. Train small proxy models on candidate mixtures and keep the best one.

The idea of DoReMi / RegMix / data-mixing laws at its plainest: every candidate weighting of the
run's sources trains the same tiny proxy (same data, tokenizer and token sets, same seed, only
`tokens.mixture.weights` differs) and is judged by its validation loss on each source. The score is
the mean of the per-source losses by default, i.e. every source is a target domain of equal
importance, whatever its size; `target="code"` optimises one source instead. A proxy ranks mixtures,
it does not predict the big run's loss: keep proxies alike and compare them only with each other.

Candidates: `grid_step` (every point of the simplex on that step: 0.5 over two sources is
{1,0}, {.5,.5}, {0,1}), `n` Dirichlet(1) samples seeded by `seed`, or an explicit list (`mixtures`,
a list of {source: weight}, a JSON/YAML string of one, or a YAML file). Runs go through
`lmforge.sweep`, so finished proxies are read back when the search is repeated.

Outputs in `<out_dir>/mixture_search/`: results.json, loss_per_source.png and best_mixture.yaml
(`tokens: {mixture: {weights: ...}}`, for `lmforge run --config recipe.yaml --config best_mixture.yaml`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmforge.config import ConfigError, RunConfig
from lmforge.io_utils import atomic_write_json, atomic_write_text
from lmforge.recipe import parse_override
from lmforge.sweep import RunResult, SweepRun, prepare_shared, run_sweep

MAX_CANDIDATES = 200  # a grid finer than this is a typo more often than a plan


def proxy_defaults(cfg: RunConfig) -> dict[str, Any]:
    """Tiny proxy settings: a 3-candidate search on the built-in corpus takes minutes on 2 CPU cores.
    Keys the user sets on the command line win over these (see `cli_main`)."""
    return {
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "train.seq_len": min(128, cfg.model.max_seq_len),
        "train.batch_size": 16,
        "train.max_steps": 300,
        "train.schedule.warmup_steps": 10,
        "train.checkpoint_every": 300,  # one checkpoint: proxies are short and resumed only when killed
        "eval.generate.max_new_tokens": 8,
    }


# ---------------------------------------------------------------------------- candidates


def grid_candidates(sources: list[str], step: float) -> list[dict[str, float]]:
    """Every weighting of `sources` in multiples of `step` (which must divide 1); corners included."""
    units = round(1 / step) if step > 0 else 0
    if not 0 < step <= 1 or abs(units * step - 1) > 1e-6:
        raise ConfigError(f"--grid-step: must divide 1, e.g. 0.5, 0.25 or 0.1 (got {step!r})")
    k = len(sources)
    if math.comb(units + k - 1, k - 1) > MAX_CANDIDATES:
        raise ConfigError(f"--grid-step {step} over {k} sources makes {math.comb(units + k - 1, k - 1)} "
                          f"candidates (more than {MAX_CANDIDATES}): use a coarser step or --n")
    out = []
    for bars in itertools.combinations(range(units + k - 1), k - 1):  # stars and bars
        edges = [-1, *bars, units + k - 1]
        counts = [edges[i + 1] - edges[i] - 1 for i in range(k)]
        out.append({s: round(c / units, 6) for s, c in zip(sources, counts, strict=True)})
    return out


def random_candidates(sources: list[str], n: int, seed: int, alpha: float = 1.0) -> list[dict[str, float]]:
    """`n` weightings drawn from a symmetric Dirichlet(alpha) (1: uniform over the simplex), rounded
    to 3 decimals so names and tables stay readable; the same seed gives the same list."""
    if n < 1:
        raise ConfigError(f"--n: must be >= 1 (got {n})")
    draws = np.random.default_rng(seed).dirichlet(np.full(len(sources), alpha), size=n)
    return [_round_to_simplex(dict(zip(sources, map(float, row), strict=True))) for row in draws]


def _round_to_simplex(weights: dict[str, float], digits: int = 3) -> dict[str, float]:
    out = {s: round(w, digits) for s, w in weights.items()}
    largest = max(out, key=lambda s: out[s])  # the rounding error goes where it is relatively smallest
    out[largest] = round(1.0 - sum(w for s, w in out.items() if s != largest), digits)
    return out


def parse_mixtures(spec: str | Path | list[Any], sources: list[str]) -> list[dict[str, float]]:
    """An explicit candidate list: a list of {source: weight}, a JSON/YAML string of one, or a YAML
    file holding one (or {mixtures: [...]}). Each is checked and normalised to sum 1; sources it
    leaves out get 0."""
    items: Any = spec
    if isinstance(spec, Path) or (isinstance(spec, str) and Path(spec).is_file()):
        items = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
    elif isinstance(spec, str):
        try:
            items = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise ConfigError(f"--mixtures: neither a file nor valid JSON/YAML: {e}") from e
    if isinstance(items, dict) and "mixtures" in items:
        items = items["mixtures"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--mixtures: expected a non-empty list of {{source: weight}} mappings (got {items!r})")
    return [check_mixture(m, sources, f"--mixtures[{i}]") for i, m in enumerate(items)]


def check_mixture(weights: Any, sources: list[str], where: str) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{where}: expected a mapping of source -> weight (got {weights!r})")
    for name, w in weights.items():
        if name not in sources:
            raise ConfigError(f"{where}: unknown source {name!r}; the train token sets have: {', '.join(sources)}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}.{name}: must be a number >= 0 (got {w!r})")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ConfigError(f"{where}: every weight is 0")
    return {s: round(float(weights.get(s, 0.0)) / total, 6) for s in sources}


def candidate_name(weights: dict[str, float]) -> str:
    """A name from the weights, so a repeated search finds the proxies it already trained."""
    return "_".join(f"{re.sub(r'[^A-Za-z0-9.-]', '-', s)}{w:.3g}" for s, w in sorted(weights.items()))


def make_candidates(sources: list[str], mixtures: str | Path | list[Any] | None = None,
                    grid_step: float | None = None, n: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """The candidates of one of the three modes (default: the grid on step 0.5); repeats dropped."""
    if sum(x is not None for x in (mixtures, grid_step, n)) > 1:
        raise ConfigError("choose one of --mixtures, --grid-step and --n")
    if mixtures is not None:
        found = parse_mixtures(mixtures, sources)
    elif n is not None:
        found = random_candidates(sources, n, seed)
    else:
        found = grid_candidates(sources, 0.5 if grid_step is None else grid_step)
    seen: set[str] = set()
    unique = []
    for w in found:
        if candidate_name(w) not in seen:
            seen.add(candidate_name(w))
            unique.append(w)
    return unique


# ---------------------------------------------------------------------------- scoring and outputs


def score_name(target: str | None, val_sources: list[str]) -> str:
    if target:
        return f"validation loss of {target}"
    return f"mean of per-source validation losses ({', '.join(val_sources)})"


def score(ev: dict[str, Any], target: str | None) -> float:
    """The quantity minimised: one source's loss, or the unweighted mean over the validation sources
    (the token-weighted overall loss would let the biggest source decide)."""
    losses = {s: m["loss"] for s, m in ev["sources"].items()}
    if target:
        return losses[target]
    return sum(losses.values()) / len(losses)


def candidate_rows(results: list[RunResult], weights: list[dict[str, float]], target: str | None) -> list[dict]:
    rows = []
    for r, w in zip(results, weights, strict=True):
        row: dict[str, Any] = {"name": r.name, "weights": w, "status": r.status, "run_dir": r.run_dir,
                               "seconds": round(r.seconds, 1), "error": r.error}
        if r.ok:
            row.update(loss=r.eval["loss"], score=score(r.eval, target),
                       source_losses={s: m["loss"] for s, m in r.eval["sources"].items()},
                       tokens_seen=r.train.get("tokens_seen"), params=r.train.get("params"))
        rows.append(row)
    return rows


def format_table(rows: list[dict], sources: list[str], val_sources: list[str], best: str | None) -> str:
    head = [*(f"w:{s}" for s in sources), *(f"val {s}" for s in val_sources), "overall", "score"]
    lines = ["  ".join(f"{h:>10}" for h in head) + "  candidate"]
    for r in rows:
        cells = [f"{r['weights'][s]:>10.3f}" for s in sources]
        if r["status"] == "failed":
            cells.append(f"  failed: {r['error']}")
        else:
            cells += [f"{r['source_losses'].get(s, float('nan')):>10.4f}" for s in val_sources]
            cells += [f"{r['loss']:>10.4f}", f"{r['score']:>10.4f}"]
        mark = " *" if r["name"] == best else ""
        lines.append("  ".join(cells) + f"  {r['name']}{mark}")
    return "\n".join(lines)


def plot_losses(rows: list[dict], val_sources: list[str], best: str | None, path: Path, title: str) -> None:
    """Grouped bars: each candidate's validation loss per source, and its score. Figure + Agg canvas
    directly, not pyplot, so the library never switches the caller's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] != "failed"]
    series = [*val_sources, "score"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(ok) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        ys = [r["score"] if name == "score" else r["source_losses"].get(name, np.nan) for r in ok]
        xs = np.arange(len(ok)) + (j - (len(series) - 1) / 2) * width
        ax.bar(xs, ys, width, label=name, color="black" if name == "score" else None)
    labels = ["\n".join(f"{s} {w:.2f}" for s, w in r["weights"].items()) + ("\n(best)" if r["name"] == best else "")
              for r in ok]
    ax.set_xticks(np.arange(len(ok)), labels, fontsize=8)
    lows = [r["score"] for r in ok] + [v for r in ok for v in r["source_losses"].values()]
    ax.set_ylim(max(0.0, min(lows) - 0.3), max(lows) + 0.1)  # losses differ in the decimals: zoom in
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def best_fragment(best: dict[str, Any], score_text: str, n: int) -> str:
    header = (f"# lmforge mixture-search: the best of {n} candidates by {score_text} (score {best['score']:.4f}).\n"
              "# Use: lmforge run --config recipe.yaml --config best_mixture.yaml  (or copy it into the recipe)\n")
    body = yaml.safe_dump({"tokens": {"mixture": {"weights": best["weights"]}}}, sort_keys=False)
    return header + body


# ---------------------------------------------------------------------------- the search


def mixture_search(
    cfg: RunConfig,
    mixtures: str | Path | list[Any] | None = None,
    grid_step: float | None = None,
    n: int | None = None,
    seed: int | None = None,
    target: str | None = None,
    proxy: dict[str, Any] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Search the mixture of `cfg`'s sources; returns what results.json holds plus "table".
    `proxy`: dotted overrides for every proxy (None: `proxy_defaults(cfg)`; {}: the recipe as is).
    "best" is None when every candidate failed (each failure is in "candidates")."""
    if cfg.tokens.curriculum:
        raise ConfigError("tokens.curriculum: mixture-search sets tokens.mixture, which a curriculum overrides; "
                          "search with tokens.curriculum=[] and put the result into the stages")
    prepare_shared(cfg, progress)
    sources, val_sources = _sources(cfg)
    if target is not None and target not in val_sources:
        raise ConfigError(f"--target: no validation source {target!r}; there are: {', '.join(val_sources)}")
    weights = make_candidates(sources, mixtures, grid_step, n, cfg.seed if seed is None else seed)
    proxy = proxy_defaults(cfg) if proxy is None else proxy
    runs = [SweepRun(candidate_name(w), {**proxy, "tokens.mixture.weights": w}) for w in weights]
    rows = candidate_rows(run_sweep(cfg, runs, workers=workers, progress=progress), weights, target)
    return _write_outputs(cfg, rows, sources, val_sources, target, proxy)


def _sources(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Train sources with tokens (what a mixture can weigh) and validation sources (what scores it)."""
    from lmforge.tokens.token_sets import read_split_manifest

    def names(split: str) -> list[str]:
        return sorted(s for s, m in read_split_manifest(cfg.out / "tokens", split)["sources"].items() if m["n_tokens"])

    return names("train"), names("val")


def _write_outputs(cfg: RunConfig, rows: list[dict], sources: list[str], val_sources: list[str],
                   target: str | None, proxy: dict[str, Any]) -> dict[str, Any]:
    out_dir = cfg.out / "mixture_search"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r["status"] != "failed"]
    best = min(done, key=lambda r: r["score"]) if done else None
    text = score_name(target, val_sources)
    result: dict[str, Any] = {
        "sources": sources, "val_sources": val_sources, "target": target, "score": text, "proxy": proxy,
        "candidates": rows,
        "best": {k: best[k] for k in ("name", "weights", "score", "loss", "source_losses")} if best else None,
        "paths": {"results": str(out_dir / "results.json")},
    }
    if best:
        plot_losses(rows, val_sources, best["name"], out_dir / "loss_per_source.png", f"mixture search: {text}")
        atomic_write_text(out_dir / "best_mixture.yaml", best_fragment(best, text, len(rows)))
        result["paths"].update(plot=str(out_dir / "loss_per_source.png"), best=str(out_dir / "best_mixture.yaml"))
    atomic_write_json(out_dir / "results.json", result)
    result["table"] = format_table(rows, sources, val_sources, best["name"] if best else None)
    return result


# ---------------------------------------------------------------------------- command line


def add_cli_options(sp: argparse.ArgumentParser) -> None:
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--grid-step", type=float, help="every weighting on this step of the simplex (default 0.5)")
    mode.add_argument("--n", type=int, help="this many random weightings (Dirichlet(1), seeded by --seed)")
    mode.add_argument("--mixtures", help='explicit list: \'[{"prose": 0.7, "code": 0.3}, ...]\' or a YAML file')
    sp.add_argument("--seed", type=int, help="seed of --n (default: the run's seed)")
    sp.add_argument("--target", metavar="SOURCE", help="minimise this source's val loss (default: mean over sources)")
    sp.add_argument("--workers", type=int, default=1, help="proxies trained at once, one process each (default 1)")
    sp.add_argument("--no-proxy-defaults", action="store_true", help="train proxies with the recipe's own settings")


def cli_main(args: argparse.Namespace, cfg: RunConfig, progress: bool) -> int:
    proxy: dict[str, Any] = {} if args.no_proxy_defaults else proxy_defaults(cfg)
    # A key given on the command line is the user's choice for the proxies too: drop the default.
    given = [parse_override(o)[0] for o in args.overrides]
    proxy = {k: v for k, v in proxy.items() if not any(k == g or k.startswith(f"{g}.") for g in given)}
    result = mixture_search(cfg, args.mixtures, args.grid_step, args.n, args.seed, args.target, proxy,
                            args.workers, progress)
    print(result["table"])
    print(f"score: {result['score']}")
    if result["best"] is None:
        print("lmforge: error: every candidate failed (errors above and in results.json)", file=sys.stderr)
        return 1
    print(f"best: {result['best']['name']} -> {result['paths']['best']}; all results: {result['paths']['results']}")
    return 0


class _CallableModule(types.ModuleType):
    """`lmforge.mixture_search(...)` must call the function, but importing this submodule makes the
    package attribute of that name the module itself; a callable module serves both."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return mixture_search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

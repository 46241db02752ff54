"""`lmforge eval eval.checkpoints=[...]`: validation loss of several checkpoints of one run, as a
table and a plot of loss against tokens seen (eval_checkpoints.json / .png beside eval.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.io_utils import atomic_write_json


def checkpoint_list(root: Path, wanted: list[str]) -> list[Path]:
    """"all" (every kept checkpoint), step numbers, or checkpoint directories; a missing one is an
    error that names it and what is there."""
    from lmforge.train.checkpoint import list_checkpoints, step_dir_name

    kept = list_checkpoints(root)
    if wanted == ["all"]:
        if not kept:
            raise FileNotFoundError(f"eval.checkpoints: no checkpoints in {root}")
        return [p for _, p in kept]
    out = []
    for item in wanted:
        path = root / step_dir_name(int(item)) if str(item).isdigit() else Path(item)
        if not path.is_dir():
            have = ", ".join(str(s) for s, _ in kept) or "none"
            raise FileNotFoundError(f"eval.checkpoints: {item!r} is not a checkpoint ({path}); kept steps: {have}")
        out.append(path)
    return out


def evaluate_checkpoints(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    from lmforge.eval.perplexity import evaluate_sources
    from lmforge.run_dir import RunPaths, load_trained, objective_for, open_datasets
    from lmforge.train.checkpoint import read_state
    from lmforge.train.trainer import resolve_device

    paths = RunPaths(cfg.out)
    device = resolve_device(cfg.train.device)
    _, val_ds = open_datasets(paths)
    rows = []
    for ckpt in checkpoint_list(paths.checkpoints, cfg.eval.checkpoints):
        one = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint=str(ckpt), checkpoints=[]))
        model, trained, _ = load_trained(one)
        m = evaluate_sources(model.to(device), val_ds, objective_for(one, trained), trained.train.seq_len,
                             cfg.eval.batch_size, cfg.eval.max_tokens, device, progress)
        state = read_state(ckpt)
        rows.append({"checkpoint": str(ckpt), "step": state["step"], "tokens": state["tokens_seen"],
                     "loss": m["loss"], "perplexity": m["perplexity"],
                     "sources": {k: v["loss"] for k, v in m["sources"].items()}})
    rows.sort(key=lambda r: r["tokens"])
    atomic_write_json(paths.root / "eval_checkpoints.json", rows)
    plot = _plot(rows, paths.root / "eval_checkpoints.png")
    return {"checkpoints": rows, "plot": str(plot), "table": _table(rows)}


def _table(rows: list[dict[str, Any]]) -> str:
    sources = sorted({s for r in rows for s in r["sources"]})
    head = ["step", "tokens", "loss", "ppl", *sources]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = [str(r["step"]), f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}",
                 *(f"{r['sources'].get(s, float('nan')):.4f}" for s in sources)]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from lmforge.plots import save_figure, subplots

    fig, ax = subplots(figsize=(6, 4))
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["loss"] for r in rows], "o-", label="all sources")
    for s in sorted({s for r in rows for s in r["sources"]}):
        ax.plot(tokens, [r["sources"].get(s, float("nan")) for r in rows], ".--", label=s)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    return save_figure(fig, path)

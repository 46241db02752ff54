"""E8: one self-contained HTML page per run (`<out_dir>/report.html`): the data ledger and its chart,
tokenizer statistics, loss / LR / throughput curves, validation loss per source, zero-shot results,
the sample and the export check. Everything is rebuilt from the files a run leaves (JSON, JSONL,
PNG), so `lmforge report out_dir=...` makes it again at any time; images are inlined, so the page is
one file that can be mailed or archived. A section whose files are missing says so."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from lmforge.io_utils import atomic_write_text
from lmforge.plots import figure_png, subplots

STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}.missing{color:#999}"""


def build_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    parts = [f"<h1>lmforge run: {html.escape(run_dir.name)}</h1>",
             _data(run_dir), _tokens(run_dir), _training(run_dir), _validation(run_dir),
             _zero_shot(run_dir), _sample(run_dir), _export(run_dir)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge: {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _missing(what: str) -> str:
    return f"<p class='missing'>{html.escape(what)}: not produced by this run.</p>"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _data(run: Path) -> str:
    ledger = _json(run / "data" / "ledger.json")
    if ledger is None:
        return "<h2>Data</h2>" + _missing("data/ledger.json")
    rows = [[step, source, c["docs_in"], c["docs_kept"], c["docs_removed"], c["bytes_kept"] / 1e6]
            for step in ledger["steps"] for source, c in sorted(ledger["counts"].get(step, {}).items())]
    out = "<h2>Data</h2>" + _table(["step", "source", "in", "kept", "removed", "MB kept"], rows)
    chart = run / "data" / "removed.png"
    return out + (_img(chart.read_bytes(), "documents removed per step and source") if chart.is_file() else "")


def _tokens(run: Path) -> str:
    split = _json(run / "tokens" / "train.json")
    if split is None:
        return "<h2>Tokenizer and tokens</h2>" + _missing("tokens/train.json")
    rows = [[name, s["n_docs"], s["n_tokens"], s["bytes_per_token"]] for name, s in sorted(split["sources"].items())]
    return (f"<h2>Tokenizer and tokens</h2><p>vocabulary {split['vocab_size']:,}; train split "
            f"{split['n_tokens']:,} tokens of {split['n_docs']:,} documents.</p>"
            + _table(["source", "documents", "tokens", "bytes/token"], rows))


def _training(run: Path) -> str:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return "<h2>Training</h2>" + _missing("metrics.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not steps:
        return "<h2>Training</h2>" + _missing("training steps")
    return "<h2>Training</h2>" + _img(_curves(steps, evals), "loss, learning rate and throughput")


def _curves(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bytes:
    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    axes[0].set_title("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(x, [r["lr"] for r in steps])
    axes[1].set_title("learning rate")
    rated = [r for r in steps if "tokens_per_s" in r]
    axes[2].plot([r["step"] for r in rated], [r["tokens_per_s"] for r in rated])
    axes[2].set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
    return figure_png(fig)


def _validation(run: Path) -> str:
    ev = _json(run / "eval.json")
    if ev is None:
        return "<h2>Validation</h2>" + _missing("eval.json")
    rows = [["all sources", ev.get("tokens", ""), ev["loss"], ev.get("perplexity", ""), ev.get("bits_per_byte", "")]]
    rows += [[name, m.get("tokens", ""), m["loss"], m.get("perplexity", ""), m.get("bits_per_byte", "")]
             for name, m in sorted(ev.get("sources", {}).items())]
    base = (f"<p>{html.escape(str(ev.get('objective', '')))} objective; loss at init {ev.get('loss_at_init', 0):.3f}, "
            f"unigram baseline {ev.get('unigram_loss', 0):.3f}.</p>")
    return "<h2>Validation</h2>" + base + _table(["source", "tokens", "loss", "perplexity", "bits/byte"], rows)


def _zero_shot(run: Path) -> str:
    ev = _json(run / "eval.json") or {}
    tasks = ev.get("zero_shot")
    if not tasks:
        return "<h2>Zero-shot tasks</h2>" + _missing(ev.get("zero_shot_skipped", "eval.tasks"))
    cont = ev.get("contamination", {})
    rows = [[name, r["n"], r["acc"], r.get("acc_stderr") or "", r["acc_norm"], r.get("acc_norm_stderr") or "",
             cont.get(name, {}).get("share", "")] for name, r in sorted(tasks.items())]
    return "<h2>Zero-shot tasks</h2>" + _table(
        ["task", "items", "acc", "± stderr", "acc_norm", "± stderr", "13-gram contaminated share"], rows)


def _sample(run: Path) -> str:
    ev = _json(run / "eval.json") or {}
    if "sample" not in ev:
        return "<h2>Sample</h2>" + _missing("a sample")
    return (f"<h2>Sample</h2><p>prompt <code>{html.escape(repr(ev.get('prompt', '')))}</code></p>"
            f"<pre>{html.escape(str(ev['sample']))}</pre>")


def _export(run: Path) -> str:
    check = _json(run / "export" / "check.json")
    if check is None:
        return "<h2>Export</h2>" + _missing("export/check.json")
    rows = [[k, v] for k, v in check.items() if isinstance(v, str | int | float | bool)]
    return "<h2>Export</h2>" + _table(["", "value"], rows)

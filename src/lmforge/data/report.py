"""`data/report.md` + `data/removed.png`: what each step removed per source, and a few removals per
reason with where they came from, so a person can check a cleaning run without reading JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.io_utils import atomic_write_bytes, atomic_write_text
from lmforge.plots import figure_png, subplots

EXAMPLES_PER_REASON = 3
CHART_SOURCES = 8  # bars in the removal chart: the sources that lost most, then one for the rest


def write_report(out_dir: Path, ledger: dict[str, Any]) -> Path:
    """Writes the chart and the Markdown page into `out_dir` (the data stage's output); returns the page."""
    examples = _examples(out_dir / "removed.jsonl")
    chart = _chart(out_dir / "removed.png", ledger)
    lines = ["# Data stage report", "", "## Documents per step and source", "",
             "| step | source | in | kept | removed | removed % | MB kept |", "|---|---|---:|---:|---:|---:|---:|"]
    for step in ledger["steps"]:
        for source, c in sorted(ledger["counts"].get(step, {}).items()):
            pct = 100 * c["docs_removed"] / c["docs_in"] if c["docs_in"] else 0.0
            lines.append(f"| {step} | {source} | {c['docs_in']} | {c['docs_kept']} | {c['docs_removed']} | "
                         f"{pct:.1f} | {c['bytes_kept'] / 1e6:.2f} |")
    t = ledger["totals"]
    lines += ["", f"Total: {t['docs_in']} in, {t['docs_kept']} kept, {t['docs_removed']} removed.", ""]
    if chart:
        lines += ["![removed per step and source](removed.png)", ""]
    for name, summary in ledger.get("dedup", {}).items():
        lines.append(f"- dedup `{name}`: " + ", ".join(f"{k} {v}" for k, v in summary.items()
                                                         if isinstance(v, int | float | str)))
    lines += ["", "## Removed examples (first of each reason)", ""]
    for (step, reason), records in examples.items():
        lines.append(f"### {step}: {reason}")
        lines += [f"- `{r['id']}` ({r['source']}): {json.dumps(r['detail'], ensure_ascii=False)[:300]}"
                  for r in records]
        lines.append("")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _examples(removed: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with open(removed, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            # Reasons carry numbers ("words=3<25"): group by the part before them.
            key = (r["step"], r["reason"].split("=")[0])
            bucket = out.setdefault(key, [])
            if len(bucket) < EXAMPLES_PER_REASON:
                bucket.append(r)
    return out


def _chart(path: Path, ledger: dict[str, Any]) -> bool:
    """Stacked bars: documents removed by each step, one colour per source. False if nothing was."""
    steps = ledger["steps"]
    sources = sorted({s for by in ledger["counts"].values() for s in by})
    removed = {s: [ledger["counts"].get(step, {}).get(s, {}).get("docs_removed", 0) for step in steps]
               for s in sources}
    if not any(any(v) for v in removed.values()):
        return False
    removed = _top_sources(removed)
    fig, ax = subplots(figsize=(max(6, len(steps) * 1.2), 4))
    bottom = [0] * len(steps)
    for s in removed:
        ax.bar(steps, removed[s], bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, removed[s], strict=True)]
    ax.set_ylabel("documents removed")
    ax.set_title("removed per step and source")
    ax.legend()
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
    atomic_write_bytes(path, figure_png(fig, dpi=100))
    return True


def _top_sources(removed: dict[str, list[int]]) -> dict[str, list[int]]:
    """The CHART_SOURCES sources that lost the most documents, the rest summed as one bar: a folder
    of many files is many sources (one per file), and a legend of hundreds fits no figure."""
    if len(removed) <= CHART_SOURCES:
        return removed
    ranked = sorted(removed, key=lambda s: (-sum(removed[s]), s))
    top, rest = ranked[: CHART_SOURCES - 1], ranked[CHART_SOURCES - 1 :]
    other = [sum(col) for col in zip(*(removed[s] for s in rest), strict=True)]
    return {**{s: removed[s] for s in top}, f"{len(rest)} other sources": other}

"""Bytes per token by source: how well a tokenizer compresses each kind of text of a run.

More bytes (or characters) per token means shorter sequences for the same text, so more text per
training step and per context window; a source far below the others is one the vocabulary serves
badly (a language or a code style the tokenizer hardly saw), the case for `extend_vocabulary`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer

from lmforge.config import RunConfig

ALL = "all"
_BATCH = 256


def measure(tokenizer: Tokenizer, items: Iterable[tuple[str, str]], max_bytes_per_source: int = 0) -> dict[str, Any]:
    """{source: {docs, bytes, chars, tokens, bytes_per_token, chars_per_token}} over (source, text)
    pairs, plus an "all" row; a source stops taking texts once it has `max_bytes_per_source` bytes
    (0: no cap). Texts are encoded as the token shards encode them: no added tokens, and a special
    token written in the text counts as text."""
    rows: dict[str, dict[str, int]] = {}
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        for batch in _batches(_capped(items, rows, max_bytes_per_source)):
            encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
            for (source, _), enc in zip(batch, encodings, strict=True):
                rows[source]["tokens"] += len(enc.ids)
    finally:
        tokenizer.encode_special_tokens = previous
    total = {key: sum(row[key] for row in rows.values()) for key in ("docs", "bytes", "chars", "tokens")}
    return {name: _ratios(row) for name, row in sorted(rows.items()) + [(ALL, total)]}


def _capped(items: Iterable[tuple[str, str]], rows: dict[str, dict[str, int]], cap: int) -> Iterator[tuple[str, str]]:
    for source, text in items:
        row = rows.setdefault(source, {"docs": 0, "bytes": 0, "chars": 0, "tokens": 0})
        if cap and row["bytes"] >= cap:
            continue
        row["docs"] += 1
        row["bytes"] += len(text.encode("utf-8"))
        row["chars"] += len(text)
        yield source, text


def _batches(items: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _ratios(row: dict[str, int]) -> dict[str, Any]:
    tokens = max(row["tokens"], 1)
    return {**row, "bytes_per_token": row["bytes"] / tokens, "chars_per_token": row["chars"] / tokens}


def format_table(rows: dict[str, dict[str, Any]], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'source':<16}{'docs':>10}{'bytes':>15}{'tokens':>14}{'bytes/token':>13}{'chars/token':>13}")
    for name, r in rows.items():
        lines.append(
            f"{name:<16}{r['docs']:>10,}{r['bytes']:>15,}{r['tokens']:>14,}"
            f"{r['bytes_per_token']:>13.2f}{r['chars_per_token']:>13.2f}"
        )
    return "\n".join(lines)


def tokenizer_report(cfg: RunConfig, split: str = "val", max_bytes_per_source: int = 50_000_000) -> dict[str, Any]:
    """Bytes/token per source of the run's tokenizer on its clean `split` documents (val: text the
    tokenizer was not trained on). Returns {"tokenizer", "split", "sources": rows, "table"}."""
    from lmforge.data.doc_shards import read_documents
    from lmforge.run_dir import RunPaths, need
    from lmforge.tokenizer.train import load_tokenizer

    paths = RunPaths(cfg.out)
    tokenizer = load_tokenizer(need(paths.tokenizer, "tokenizer"))
    docs = read_documents(need(paths.data / split, "data"), meta=False)
    rows = measure(tokenizer, ((d.source, d.text) for d in docs), max_bytes_per_source)
    title = f"tokenizer {paths.tokenizer} (vocab {tokenizer.get_vocab_size():,}) on the {split} split"
    return {"tokenizer": str(paths.tokenizer), "split": split, "sources": rows, "table": format_table(rows, title)}

"""The tiktoken export beside a tokenizer: its BPE as tiktoken's own files.

`tokenizer.tiktoken` holds the mergeable ranks in tiktoken's file format (one `base64(token bytes)
rank` line per token, what `tiktoken.load.load_tiktoken_bpe` reads) and `tiktoken.json` the split
regex, the rank -> id table when ranks are not our ids, and the sha256 of the tokenizer.json they
were checked against; or, when tiktoken cannot reproduce the tokenizer, the reason. The tokenizer
stage and `lmforge extend-vocab` write it; `lmforge tokenize` then builds its encoder without
repeating the per-merge check, which grows with the vocabulary (~30 ms at 4k tokens, seconds at
128k). Plain tiktoken can use it too:

    meta = json.load(open("tokenizer/tiktoken.json"))
    enc = tiktoken.Encoding("mine", pat_str=meta["pat_str"],
                            mergeable_ranks=load_tiktoken_bpe("tokenizer/tokenizer.tiktoken"),
                            special_tokens=meta["special_tokens"])

(ids are ours when `ids_by_rank` is null, as for every tokenizer lmforge trains).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import xxhash
from tokenizers import Tokenizer

from lmforge.io_utils import atomic_write_bytes, atomic_write_json
from lmforge.tokenizer.bpe_ranks import Ranks
from lmforge.tokenizer.fast_encode import FastEncoder, FastPathUnavailable, build_tiktoken_path
from lmforge.tokenizer.train import tokenizer_hash

RANKS_NAME = "tokenizer.tiktoken"
META_NAME = "tiktoken.json"
FORMAT = "lmforge-tiktoken"
VERSION = 1  # bump when fast_encode's checks change: older exports are then checked again


def export_tiktoken(tokenizer_path: Path) -> str:
    """Check the tokenizer at `tokenizer_path` (its tokenizer.json) for the fast path and write the
    export beside it; return a line saying what was written."""
    tokenizer_path = Path(tokenizer_path)
    ranks_path, meta_path = tokenizer_path.with_name(RANKS_NAME), tokenizer_path.with_name(META_NAME)
    meta_path.unlink(missing_ok=True)  # the marker goes first, so a crash never pairs old and new files
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "tokenizer_sha256": tokenizer_hash(tokenizer_path),
                            "tiktoken_version": _tiktoken_version()}
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    try:
        path = build_tiktoken_path(tokenizer, specials_as_text=True)
    except FastPathUnavailable as e:
        ranks_path.unlink(missing_ok=True)
        atomic_write_json(meta_path, {**meta, "available": False, "reason": str(e)})
        return f"tiktoken export: not written, tiktoken cannot reproduce this tokenizer ({e})"
    ranks, rank_to_id = path.ranks
    data = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(), key=_by_rank))
    atomic_write_bytes(ranks_path, data)
    ids_by_rank = None if rank_to_id is None else [rank_to_id[r] for r in range(len(rank_to_id))]
    atomic_write_json(meta_path, {**meta, "available": True, "pat_str": path.pattern, "special_tokens": path.specials,
                                  "ids_by_rank": ids_by_rank, "ranks_xxh64": xxhash.xxh64(data).hexdigest()})
    return f"tiktoken export: {ranks_path} ({len(ranks):,} ranks)"


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


def load_export(tokenizer_path: Path, sha256: str | None = None) -> Ranks | str | None:
    """The exported ranks when they were checked against this very tokenizer.json, the recorded reason
    when the fast path was found impossible for it, or None (no export, or a stale or damaged one).
    `sha256`: the tokenizer file's, when the caller already hashed it."""
    tokenizer_path = Path(tokenizer_path)
    try:
        meta = json.loads(tokenizer_path.with_name(META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
        return None
    if meta.get("tokenizer_sha256") != (sha256 or tokenizer_hash(tokenizer_path)):
        return None
    if not meta.get("available"):
        # A refusal may come from tiktoken itself (its regex engine, a panic, not installed): another
        # tiktoken is asked again.
        if meta.get("tiktoken_version") != _tiktoken_version():
            return None
        return str(meta.get("reason", "recorded as unavailable"))
    try:
        data = tokenizer_path.with_name(RANKS_NAME).read_bytes()
    except OSError:
        return None
    if xxhash.xxh64(data).hexdigest() != meta.get("ranks_xxh64"):
        return None
    # The file is the one export_tiktoken wrote (its checksum matched): "token rank" per line, so a
    # whitespace split pairs them; binascii and map keep it in C (base64.b64decode's checks cost 4x).
    fields = data.split()
    ranks = dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))
    ids = meta.get("ids_by_rank")
    return ranks, None if ids is None else dict(enumerate(ids))


def _tiktoken_version() -> str | None:
    try:
        import tiktoken
    except ImportError:
        return None
    return str(tiktoken.__version__)


def encoder_for(
    tokenizer: Tokenizer, tokenizer_path: Path, threads: int | None = None, sha256: str | None = None
) -> FastEncoder:
    """The tokenize stage's encoder (special tokens read as text), from the export when it is valid."""
    exported = load_export(tokenizer_path, sha256)
    return FastEncoder(tokenizer, threads=threads, specials_as_text=True, exported=exported)

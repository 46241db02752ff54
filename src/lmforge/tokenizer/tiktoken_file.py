"""The tiktoken export beside a tokenizer: its BPE as tiktoken's own files.

`tokenizer.tiktoken` holds the mergeable ranks in tiktoken's file format (one `base64(token bytes)
rank` line per token, what `tiktoken.load.load_tiktoken_bpe` reads) and `tiktoken.json` the split
regex, the rank -> id table when ranks are not our ids, the ranks' range when they are contiguous,
and the sha256 of the tokenizer.json they were checked against; or, when tiktoken cannot reproduce
the tokenizer, the reason. The tokenizer
stage and `lmforge extend-vocab` write it; `lmforge tokenize` then builds its encoder without
repeating the per-merge check, which grows with the vocabulary (~30 ms at 4k tokens, seconds at
128k). The record also holds what `tokenizers` gave on the probe texts, its version, the vocabulary
size and the checksum of the roles file it was checked with: while all still hold, tokenize does not
load the tokenizer at all (`stage_encoder`). Plain tiktoken can use it too:

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

import tokenizers
import xxhash
from tokenizers import Tokenizer

from lmforge.io_utils import atomic_write_bytes, atomic_write_json
from lmforge.tokenizer.bpe_ranks import Ranks
from lmforge.tokenizer.fast_encode import (
    PROBE_TEXTS,
    FastEncoder,
    FastPathUnavailable,
    build_tiktoken_path,
    exported_path,
    probe_reference,
)
from lmforge.tokenizer.special_tokens import SpecialTokens, load_special_tokens, special_tokens_path
from lmforge.tokenizer.train import load_tokenizer, tokenizer_hash

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
    ordered = sorted(ranks.items(), key=_by_rank)
    data = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)
    atomic_write_bytes(ranks_path, data)
    ids_by_rank = None if rank_to_id is None else [rank_to_id[r] for r in range(len(rank_to_id))]
    values = [rank for _, rank in ordered]
    contiguous = values == list(range(values[0], values[0] + len(values))) if values else False
    atomic_write_json(meta_path, {**meta, "available": True, "pat_str": path.pattern, "special_tokens": path.specials,
                                  "ids_by_rank": ids_by_rank, "ranks_xxh64": xxhash.xxh64(data).hexdigest(),
                                  "rank_range": [values[0], values[-1] + 1] if contiguous else None,
                                  **_start_record(tokenizer, tokenizer_path)})
    return f"tiktoken export: {ranks_path} ({len(ranks):,} ranks)"


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _start_record(tokenizer: Tokenizer, tokenizer_path: Path) -> dict[str, Any]:
    """What lets `lmforge tokenize` start from the export alone (`stage_encoder`): the vocabulary
    size, the roles file it was checked against, and `tokenizers`' own ids of the probe texts."""
    try:
        load_special_tokens(tokenizer_path, tokenizer)  # the roles file agrees with the tokenizer
        roles = xxhash.xxh64(special_tokens_path(tokenizer_path).read_bytes()).hexdigest()
    except (OSError, ValueError):
        roles = None  # none, or one that disagrees: the tokenize stage loads the tokenizer and says why
    return {"tokenizers_version": tokenizers.__version__, "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens_xxh64": roles, "probe_ids": probe_reference(tokenizer)}


def load_export(tokenizer_path: Path, sha256: str | None = None) -> Ranks | str | None:
    """The exported ranks when they were checked against this very tokenizer.json, the recorded reason
    when the fast path was found impossible for it, or None (no export, or a stale or damaged one).
    `sha256`: the tokenizer file's, when the caller already hashed it."""
    tokenizer_path = Path(tokenizer_path)
    meta = _meta(tokenizer_path, sha256)
    if meta is None:
        return None
    if not meta.get("available"):
        # A refusal may come from tiktoken itself (its regex engine, a panic, not installed): another
        # tiktoken is asked again.
        if meta.get("tiktoken_version") != _tiktoken_version():
            return None
        return str(meta.get("reason", "recorded as unavailable"))
    ranks = _ranks(tokenizer_path, meta)
    if ranks is None:
        return None
    ids = meta.get("ids_by_rank")
    return ranks, None if ids is None else dict(enumerate(ids))


def _meta(tokenizer_path: Path, sha256: str | None) -> dict[str, Any] | None:
    """The export's record when it is of this format and was made from this very tokenizer.json."""
    try:
        meta = json.loads(tokenizer_path.with_name(META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
        return None
    return meta if meta.get("tokenizer_sha256") == (sha256 or tokenizer_hash(tokenizer_path)) else None


def _ranks(tokenizer_path: Path, meta: dict[str, Any]) -> dict[bytes, int] | None:
    try:
        data = tokenizer_path.with_name(RANKS_NAME).read_bytes()
    except OSError:
        return None
    if xxhash.xxh64(data).hexdigest() != meta.get("ranks_xxh64"):
        return None
    # The file is the one export_tiktoken wrote (its checksum matched): "token rank" per line, so a
    # whitespace split pairs them; binascii and map keep it in C (base64.b64decode's checks cost 4x).
    fields = data.split()
    first, end = meta.get("rank_range") or (None, None)
    # Contiguous ranks (every BPE lmforge trains) are recorded as their range: no int to parse per line.
    values = range(first, end) if isinstance(first, int) and isinstance(end, int) else map(int, fields[1::2])
    try:
        return dict(zip(map(binascii.a2b_base64, fields[0::2]), values, strict=True))
    except ValueError:
        return None


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


def stage_encoder(
    tokenizer_path: Path, threads: int | None = None, sha256: str | None = None
) -> tuple[FastEncoder, int, SpecialTokens]:
    """The tokenize stage's encoder, vocabulary size and roles. From the export alone when it vouches
    for all three; otherwise the tokenizer is loaded and everything checked (`encoder_for`)."""
    tokenizer_path = Path(tokenizer_path)
    sha256 = sha256 or tokenizer_hash(tokenizer_path)
    start = _start_from_export(tokenizer_path, sha256, threads)
    if start is not None:
        return start
    tok = load_tokenizer(tokenizer_path)
    tok.encode_special_tokens = True  # the stage's own copy, in the mode it encodes in
    return encoder_for(tok, tokenizer_path, threads, sha256), tok.get_vocab_size(), load_special_tokens(
        tokenizer_path, tok)


def _start_from_export(tokenizer_path: Path, sha256: str, threads: int | None) -> tuple | None:
    """Start without loading the tokenizer (at 32k tokens ~60 ms of loading, parsing and checking, and
    ~10 ms to free) when the export was made from this very tokenizer.json and roles file by these
    tiktoken and tokenizers versions, its ranks are our ids, and tiktoken still gives the probe texts
    the ids `tokenizers` gave then. Every check the full start makes is a function of those inputs."""
    meta = _meta(tokenizer_path, sha256)
    versions = (_tiktoken_version(), tokenizers.__version__)
    if meta is None or not meta.get("available") or meta.get("ids_by_rank") is not None or \
            (meta.get("tiktoken_version"), meta.get("tokenizers_version")) != versions:
        return None
    roles_path = special_tokens_path(tokenizer_path)
    try:
        roles = roles_path.read_bytes()
    except OSError:
        return None
    ranks = _ranks(tokenizer_path, meta)
    if ranks is None or meta.get("special_tokens_xxh64") != xxhash.xxh64(roles).hexdigest():
        return None
    # The roles from the bytes just checksummed (what load_special_tokens parses from this file).
    special = SpecialTokens.from_json(json.loads(roles), str(roles_path))
    try:
        # The stage reads every special token as text and joins documents with EOS, so EOS is the one
        # tiktoken needs as a special: each one more costs tiktoken's Encoding time (~2 ms for T5's
        # 100 sentinels at 32k) and none can change the ids (checked on the probe texts below).
        eos = {content: value for content, value in meta["special_tokens"].items() if value == special.eos}
        encoder = FastEncoder.from_checked_path(exported_path(meta["pat_str"], ranks, eos), threads)
        same = encoder.encode_batch(list(PROBE_TEXTS)) == meta.get("probe_ids")
    except (FastPathUnavailable, KeyError, TypeError, AttributeError):
        return None
    return (encoder, int(meta["vocab_size"]), special) if same else None

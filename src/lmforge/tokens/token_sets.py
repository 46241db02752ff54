"""Token sets per (split, source): `tokens/{split}/{source}-NNNNN.*` plus one split manifest.

Each source of a split is its own TokenDataset (shards.py), so a mixture samples sources
independently. Tokenizing is resumable at the grain of the data stage's document shards: after each
input shard every source's open token shard is finished and `tokens/{split}/progress.json` records
what is done (atomically); a killed run re-encodes only the input shards after that point. The
split manifest `tokens/{split}.json` is written last and lists every source with its token, document
and byte counts, bytes/token and the checksum of its set manifest.

With a LanguageTagger (tokens.language_tags) each document's tokens start with its language's tag, before
its text's tokens and so inside the document (its EOS still ends it); the manifest then records the
tag map and, per source, how many documents got each tag and how many got none.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tqdm import tqdm

from lmforge.data.document import Document
from lmforge.io_utils import atomic_write_json
from lmforge.tokenizer.special_tokens import language_lookup
from lmforge.tokens.shard_writer import Packed, ShardWriter, doc_batches, pack, pack_joined
from lmforge.tokens.shards import ShardError, TokenDataset, choose_dtype, set_manifest_path


class TokenizeStopped(RuntimeError):
    """A split tokenized beside another stopped because the other one failed."""


SPLIT_FORMAT = "lmforge-token-split"
SPLIT_VERSION = 1
Encode = Callable[[list[str]], Sequence[Sequence[int] | np.ndarray]]
# texts, separator id -> every text's ids followed by the separator, and each one's length with it
EncodeJoined = Callable[[list[str], int], tuple[np.ndarray, list[int]]]


LANGUAGE_META_KEY = "language"  # what the data stage's langid filter writes (data/filters/langid.py)


class LanguageTagger:
    """Which tag starts each document: the one for its meta["language"] (language_lookup: a tag's own
    code, or `en` for a lone foreign `en_XX`), or none for a language without a tag or no language."""

    def __init__(self, tags: dict[str, int]) -> None:
        self.tags = dict(tags)  # code -> id, recorded in the manifests
        self._ids = language_lookup(tags)
        self._codes = {token_id: code for code, token_id in tags.items()}

    def __call__(self, docs: list[Document]) -> tuple[list[int | None], dict[str, int]]:
        """Each document's tag id (None: no tag) and documents per tag code ("" for untagged)."""
        ids = [self._ids.get(d.meta.get(LANGUAGE_META_KEY)) for d in docs]
        counts: dict[str, int] = {}
        for token_id in ids:
            code = "" if token_id is None else self._codes[token_id]
            counts[code] = counts.get(code, 0) + 1
        return ids, counts


def split_manifest_path(tokens_dir: Path, split: str) -> Path:
    return Path(tokens_dir) / f"{split}.json"


def _file_key(path: Path) -> dict[str, Any]:
    """Identifies an input shard's content, so a resume never reuses tokens of a changed file."""
    digest = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "size": path.stat().st_size, "xxh64": digest.hexdigest()}


class _InputKeys:
    """The inputs' keys, each hashed when first needed: a fresh run needs them only for checkpoints,
    which come after each input shard but the last (a one-shard split hashes nothing)."""

    def __init__(self, inputs: list[Path]) -> None:
        self.inputs = inputs
        self._keys: list[dict[str, Any]] = []

    def first(self, n: int) -> list[dict[str, Any]]:
        while len(self._keys) < n:
            self._keys.append(_file_key(self.inputs[len(self._keys)]))
        return self._keys[:n]


def tokenize_split(
    inputs: list[Path],
    read: Callable[[Path], Iterable[Document]],
    encode: Encode,
    tokens_dir: Path,
    split: str,
    tokenizer_sha256: str,
    vocab_size: int,
    eos_id: int,
    dtype: str = "auto",
    progress: bool = True,
    encoders: Executor | None = None,
    ahead: int = 2,
    stop: threading.Event | None = None,
    encode_joined: EncodeJoined | None = None,
    tagger: LanguageTagger | None = None,
) -> dict[str, Any]:
    """Encode the documents of `inputs` (document shards, read by `read`) into one token set per
    source; resume after the last finished input shard when progress.json matches. Returns the
    split manifest. `encode` runs on the `encoders` threads (None: one of its own), which splits
    tokenized together may share, with up to `ahead` batches queued; `encode_joined`, the same
    encoder joining a source's texts with EOS itself, is used instead when given. Setting `stop`
    (another split failed) ends it at its next batch with TokenizeStopped. `tagger`: start documents
    with their language's tag (the documents read must carry meta["language"])."""
    tokens_dir = Path(tokens_dir)
    out_dir = tokens_dir / split
    split_manifest_path(tokens_dir, split).unlink(missing_ok=True)  # incomplete from here on
    keys = _InputKeys(inputs)
    identity = {"tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size, "dtype": dtype, "eos_id": eos_id}
    if tagger is not None:  # only then: untagged manifests stay as they were
        identity["language_tags"] = tagger.tags
    state = _load_progress(out_dir, identity, keys)
    if state is None and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = state["done"] if state else 0
    writers: dict[str, ShardWriter] = {}
    # source -> tag code ("" none) -> documents; resumed from progress.json with the writers
    tag_counts: dict[str, dict[str, int]] = state.get(_TAG_COUNTS, {}) if state else {}
    packer = functools.partial(_encode_packed, encode, eos_id=eos_id, vocab_size=vocab_size,
                               dtype=choose_dtype(vocab_size, dtype), joined=encode_joined, tagger=tagger)

    def writer(source: str) -> ShardWriter:
        if source not in writers:
            _check_source_name(source)
            w = ShardWriter(out_dir, source, tokenizer_sha256, vocab_size, dtype, eos_id=eos_id)
            if state and source in state["sources"]:
                w.resume(state["sources"][source])
            writers[source] = w.__enter__()
        return writers[source]

    for source in state["sources"] if state else {}:
        writer(source)
    try:
        with tqdm(desc=f"tokenize {split}", unit="doc", disable=not progress) as bar:
            for k in range(done, len(inputs)):
                for batch, groups in _encoded(doc_batches(read(inputs[k])), packer, encoders, ahead):
                    if stop is not None and stop.is_set():
                        raise TokenizeStopped(f"tokenize {split}: stopped because another split failed")
                    for source, packed in groups.items():
                        writer(source).add_packed(packed, source)
                        for code, n in packed.tag_counts.items():
                            counts = tag_counts.setdefault(source, {})
                            counts[code] = counts.get(code, 0) + n
                    bar.update(len(batch))
                if k + 1 < len(inputs):  # after the last one the writers finish their sets below
                    _checkpoint(out_dir, identity, keys, k + 1, writers, tag_counts)
    except BaseException:
        for w in writers.values():
            w.__exit__(RuntimeError, None, None)  # drops the open shard's temporary file only
        raise
    _finish(writers.values())
    manifest = _split_manifest(split, identity, writers, tag_counts if tagger is not None else None)
    atomic_write_json(split_manifest_path(tokens_dir, split), manifest)
    (out_dir / "progress.json").unlink(missing_ok=True)
    return manifest


def tokenize_splits(
    inputs: dict[str, list[Path]],
    read: Callable[[Path], Iterable[Document]],
    encode: Encode,
    tokens_dir: Path,
    tokenizer_sha256: str,
    vocab_size: int,
    eos_id: int,
    workers: int,
    dtype: str = "auto",
    progress: bool = True,
    encode_joined: EncodeJoined | None = None,
    tagger: LanguageTagger | None = None,
) -> dict[str, dict[str, Any]]:
    """`tokenize_split` of every split in `inputs`, side by side on one pool of `workers` encoder
    threads: the cores never idle while one split reads its first batch or finishes its sets (val,
    a few percent of the text, would otherwise run alone at the end). The first split runs in this
    thread, the others beside it; one that fails stops the rest at their next batch, and its own
    error is the one raised. Returns {split: manifest}."""
    stop = threading.Event()

    def run(split: str, encoders: Executor) -> dict[str, Any]:
        try:
            return tokenize_split(inputs[split], read, encode, tokens_dir, split, tokenizer_sha256, vocab_size,
                                  eos_id, dtype=dtype, progress=progress, encoders=encoders, ahead=2 * workers,
                                  stop=stop, encode_joined=encode_joined, tagger=tagger)
        except BaseException:
            stop.set()
            raise

    first, *others = inputs
    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as encoders, \
            ThreadPoolExecutor(max(len(others), 1), thread_name_prefix="tokenize-split") as side:
        beside = {split: side.submit(run, split, encoders) for split in others}
        try:
            out = {first: run(first, encoders)}
        except TokenizeStopped:
            for future in beside.values():
                if not isinstance(future.exception(), TokenizeStopped | None):
                    future.result()  # the split that failed first: its own error
            raise
        return {**out, **{split: future.result() for split, future in beside.items()}}


def _encode_packed(
    encode: Encode, batch: list[Document], eos_id: int, vocab_size: int, dtype: np.dtype,
    joined: EncodeJoined | None = None, tagger: LanguageTagger | None = None,
) -> dict[str, Packed]:
    """A batch's documents encoded and packed per source, in order: on an encoder thread, so the
    concatenating, counting and casting of a flush overlap the encoding instead of adding to it.
    `joined`: the same encoder, one call per source for all its texts, EOS after each. `tagger`: each
    document's tag id goes first; both encoder paths give the same tokens."""
    groups: dict[str, list[Document]] = {}
    for doc in batch:
        groups.setdefault(doc.source, []).append(doc)
    if joined is None:
        ids = iter(encode([d.text for d in batch]))
        by_doc = {id(doc): next(ids) for doc in batch}  # each document's ids, whatever its source
    out = {}
    for source, docs in groups.items():
        tags, counts = tagger(docs) if tagger is not None else (None, {})
        n_bytes = [d.n_bytes for d in docs]  # the text's: a tag, like EOS, carries no bytes
        if joined is not None:
            tokens, lengths = joined([d.text for d in docs], eos_id)
            if tags is not None:
                tokens, lengths = _prefix_joined(tokens, lengths, tags)
            out[source] = pack_joined(tokens, lengths, n_bytes, eos_id, vocab_size, dtype)
        else:
            doc_ids = [by_doc[id(d)] for d in docs]
            if tags is not None:
                doc_ids = [x if t is None else np.concatenate(([t], x), dtype=np.int64)
                           for x, t in zip(doc_ids, tags, strict=True)]
            out[source] = pack(doc_ids, n_bytes, eos_id, vocab_size, dtype)
        out[source].tag_counts = counts
    return out


def _prefix_joined(tokens: np.ndarray, lengths: list[int], tags: list[int | None]) -> tuple[np.ndarray, list[int]]:
    """Joined documents (each followed by EOS) with tag i inserted at document i's start."""
    at = [int(start) for start, t in zip(np.cumsum([0, *lengths[:-1]]), tags, strict=True) if t is not None]
    if not at:
        return tokens, lengths
    tokens = np.insert(tokens, at, np.array([t for t in tags if t is not None], dtype=tokens.dtype))
    return tokens, [n + (t is not None) for n, t in zip(lengths, tags, strict=True)]


def _encoded(
    batches: Iterable[list[Document]], work: Callable[[list[Document]], Any], encoders: Executor | None, ahead: int
) -> Iterator[tuple[list[Document], Any]]:
    """(batch, work(batch)) in input order. Small batches go to the `encoders` threads (the encoder
    releases the GIL), `ahead` of them queued: no thread waits at a batch boundary for the others,
    and this thread's reading and writing fill the gaps instead of adding to the time."""
    if encoders is None:
        with ThreadPoolExecutor(max_workers=1) as own:
            yield from _encoded(batches, work, own, ahead)
        return
    pending: deque[tuple[list[Document], Future]] = deque()
    for batch in batches:
        pending.append((batch, encoders.submit(work, batch)))
        if len(pending) > ahead:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _finish(writers: Iterable[ShardWriter]) -> None:
    """Finish every source's set at once: each is mostly fsyncs (its last shard, index, manifests,
    counts), which wait on the disk without the GIL, so sources overlap instead of adding up. On
    threads of their own, not the encoder pool's: a split finishing beside another (val beside
    train) would otherwise hold encoder threads waiting on the disk (~50 ms per 15 MB run)."""
    writers = list(writers)
    if len(writers) < 2:
        for w in writers:
            w.__exit__(None, None, None)
        return
    with ThreadPoolExecutor(len(writers), thread_name_prefix="tokenize-finish") as pool:
        for future in [pool.submit(w.__exit__, None, None, None) for w in writers]:
            future.result()


def _check_source_name(source: str) -> None:
    # A source names files: keep it to one plain path component.
    if not source or source in (".", "..") or any(c in source for c in "/\\\0") or source == "progress":
        raise ValueError(f"source name {source!r} cannot name a token set (no '/', '\\', NUL, '.', '..', 'progress')")


_TAG_COUNTS = "language_tag_counts"  # progress.json's key for the tag counts so far


def _checkpoint(out_dir: Path, identity: dict, keys: _InputKeys, done: int, writers: dict[str, ShardWriter],
                tag_counts: dict[str, dict[str, int]]) -> None:
    sources = {}
    for name, w in writers.items():
        w.roll()
        sources[name] = {**w.progress(), "counts_xxh64": w.save_counts(partial=True)}
    state = {**identity, "inputs": keys.first(done), "done": done, "sources": sources}
    if "language_tags" in identity:
        state[_TAG_COUNTS] = tag_counts
    atomic_write_json(out_dir / "progress.json", state)


def _load_progress(out_dir: Path, identity: dict, keys: _InputKeys) -> dict[str, Any] | None:
    """The saved progress when it belongs to this tokenizer and these same leading input shards."""
    path = out_dir / "progress.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    done = state.get("done") if isinstance(state, dict) else None
    if not isinstance(done, int) or not 0 <= done <= len(keys.inputs):
        return None
    # Both ways for the tags: a tagged run's progress must not resume an untagged run, nor the reverse.
    same = all(state.get(k) == v for k, v in identity.items()) and state.get("inputs") == keys.first(done) \
        and state.get("language_tags") == identity.get("language_tags")
    # A crash between saving a source's counts and progress.json leaves counts of a later point.
    counts_ok = all(
        (out_dir / f"{name}.counts.partial.npy").is_file()
        and xxhash.xxh64((out_dir / f"{name}.counts.partial.npy").read_bytes()).hexdigest() == src["counts_xxh64"]
        for name, src in state.get("sources", {}).items()
    )
    return state if same and counts_ok else None


def _split_manifest(split: str, identity: dict, writers: dict[str, ShardWriter],
                    tag_counts: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    sources = {}
    for name in sorted(writers):
        w = writers[name]
        assert w.summary is not None
        set_path = set_manifest_path(w.out_dir, name)
        sources[name] = {
            "n_tokens": w.summary["n_tokens"],
            "n_docs": w.summary["n_docs"],
            "n_bytes": w.summary["n_bytes"],
            "bytes_per_token": w.summary["bytes_per_token"],
            "set_xxh64": xxhash.xxh64(set_path.read_bytes()).hexdigest(),
        }
        if tag_counts is not None:
            counts = tag_counts.get(name, {})
            tagged = {code: n for code, n in sorted(counts.items()) if code}
            sources[name]["language_tags"] = {"tagged": tagged, "untagged": counts.get("", 0)}
            # Text tokens only, as ShardWriter counts them: tags, like EOS, carry no bytes.
            text_tokens = w.summary["n_tokens"] - w.summary["n_docs"] - sum(tagged.values())
            sources[name]["bytes_per_token"] = w.summary["n_bytes"] / text_tokens if text_tokens > 0 else 0.0
    totals = {k: sum(s[k] for s in sources.values()) for k in ("n_tokens", "n_docs", "n_bytes")}
    return {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, "split": split, **identity, **totals,
            "sources": sources}


def read_split_manifest(tokens_dir: Path, split: str) -> dict[str, Any]:
    path = split_manifest_path(tokens_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: tokenization of {split!r} did not finish; run `lmforge tokenize`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != SPLIT_FORMAT or m.get("version") != SPLIT_VERSION:
        raise ShardError(f"{path}: not a version {SPLIT_VERSION} {SPLIT_FORMAT} manifest; re-run `lmforge tokenize`")
    return m


def open_split(tokens_dir: Path, split: str) -> dict[str, TokenDataset]:
    """Every source's token set of `split`, each checked against the split manifest."""
    m = read_split_manifest(tokens_dir, split)
    out = {}
    for name, entry in m["sources"].items():
        _check_source_name(name)
        set_path = set_manifest_path(Path(tokens_dir) / split, name)
        if not set_path.is_file() or xxhash.xxh64(set_path.read_bytes()).hexdigest() != entry["set_xxh64"]:
            raise ShardError(f"{set_path}: missing or not the set {split_manifest_path(tokens_dir, split)} lists; "
                             "re-run `lmforge tokenize`")
        out[name] = TokenDataset(Path(tokens_dir) / split, name)
    return out

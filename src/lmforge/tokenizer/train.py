"""Byte-level BPE training with HF `tokenizers`; the saved tokenizer.json loads in `transformers`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import TokenizerConfig
from lmforge.data.document import Document
from lmforge.io_utils import atomic_write_text
from lmforge.tokenizer.special_tokens import (
    SENTINEL_TOKENS,
    SPECIAL_TOKENS,
    infer_special_tokens,
    save_special_tokens,
)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_path: Path, progress: bool = True) -> Tokenizer:
    """Train on at most cfg.max_train_bytes of `texts`, save tokenizer.json atomically, return it."""
    if cfg.kind != "bpe":
        raise ValueError(f"tokenizer.kind: {cfg.kind!r} is not supported; only 'bpe'")
    # No normalizer and byte-level everything: every UTF-8 string maps to bytes and back unchanged.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(SENTINEL_TOKENS),  # the sentinels take the top ids
        min_frequency=cfg.min_frequency,
        show_progress=progress,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen or not, so text unlike the training set still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_take_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    # T5 numbering: appended from <extra_id_99> down, so <extra_id_0> is the highest id.
    tokenizer.add_special_tokens(list(SENTINEL_TOKENS))
    special = infer_special_tokens(tokenizer, where=f"trained tokenizer {out_path}")
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected, f"special token {token!r} moved"
    atomic_write_text(Path(out_path), tokenizer.to_str(pretty=True))
    save_special_tokens(special, Path(out_path))
    return tokenizer


def spread_sample(docs: Iterable[Document], rate: float, seed: int) -> Iterator[str]:
    """Texts of a seeded, id-hashed `rate` share of `docs`: when the corpus is bigger than the
    training budget, the tokenizer sees every source and part of the corpus, not just its head."""
    if rate >= 1.0:
        yield from (d.text for d in docs)
        return
    threshold = int(rate * 2**64)
    for d in docs:
        if xxhash.xxh64_intdigest(d.id.encode("utf-8"), seed=seed) < threshold:
            yield d.text


def _take_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    """Yield texts until `budget` UTF-8 bytes were yielded; the last one is cut to fit."""
    left = budget
    for text in texts:
        if left <= 0:
            return
        data = text.encode("utf-8")
        if len(data) > left:
            # errors="ignore" drops a character cut in half at the boundary.
            text = data[:left].decode("utf-8", errors="ignore")
        left -= len(data)
        yield text


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json; its roles come from `load_special_tokens(path, tokenizer)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def tokenizer_hash(path: Path) -> str:
    """sha256 of the tokenizer file: token shards record it so a mismatched tokenizer is caught."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

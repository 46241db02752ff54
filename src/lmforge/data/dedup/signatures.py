"""MinHash signatures of texts, in numpy over batches of documents (minhash.py dedups with them).

Text is lowercased and cut into tokens made of letters, digits and combining marks (punctuation and
whitespace only separate tokens), each CJK character a token of its own, as `textstats.words`
counts them. Shingles are n-grams of tokens: word 5-grams by default (FineWeb/datatrove), or, for
documents whose tokens are mostly CJK, character 5-grams (`shingle_unit: auto`): a Chinese 5-word
window would span a whole clause, while 5 characters is about two words, close to the granularity
of an English 5-gram's edits.

Everything past `str.lower` is numpy on code-point arrays: tokens are hashed with a polynomial
rolling hash, n-grams combined and mixed, and the `bands x rows` permutations are `a*h + b mod 2^64`
(odd `a`, a bijection on 64-bit hashes) over a batch of documents at once, minimum per document by
`np.minimum.reduceat`; the top 32 bits of each minimum are kept (448 bytes a document at 14 x 8).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lmforge.data.textstats import _CJK_CHAR

CJK_CHARS_SHARE = 0.5  # `auto` shingles characters when at least this share of tokens is CJK
U64 = np.uint64
_POLY_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2^64 (needed to strip token offsets)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output, so linear sums become random."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


@lru_cache(maxsize=1)
def _char_tables() -> tuple[np.ndarray, np.ndarray]:
    """(token char, CJK char) lookups over all code points, built once per process (~0.3 s)."""
    import unicodedata

    chars = [chr(c) for c in range(0x110000)]
    word = np.fromiter((c.isalnum() or unicodedata.category(c)[0] == "M" for c in chars), bool, len(chars))
    cjk = np.zeros(len(chars), bool)
    cjk[[ord(m.group()) for m in _CJK_CHAR.finditer("".join(chars[:0xD800] + chars[0xE000:]))]] = True
    return word, cjk


@lru_cache(maxsize=8)
def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """R^i and R^-i mod 2^64 for i < size (numpy's uint64 cumprod wraps, which is the modulus)."""
    base = np.full(size, _POLY_BASE, U64)
    inv = np.full(size, pow(_POLY_BASE, -1, 1 << 64), U64)
    base[0] = inv[0] = 1
    return np.cumprod(base), np.cumprod(inv)


def token_hashes(text: str, unit: str = "auto") -> tuple[np.ndarray, bool]:
    """64-bit hashes of the text's tokens in order, and whether the tokens are single characters."""
    return batch_token_hashes([text], unit)[0]


def batch_token_hashes(texts: list[str], unit: str = "auto") -> list[tuple[np.ndarray, bool]]:
    """(token hashes, tokens are single characters) of every text, with one pass of numpy work over
    the whole batch instead of ~20 small calls per document (which dominated map's time). Tokens are
    runs of letters, digits and marks, and every CJK character alone; a text counts as CJK (character
    tokens) when CJK_CHARS_SHARE of its tokens are. Texts are joined by a newline, which is not a
    token character, so no token spans two documents, and a token's hash is a polynomial over its
    code points taken as if it started at offset 0, so a text's hashes do not depend on its batch."""
    lowered = [t.lower() for t in texts]
    cp = np.frombuffer("\n".join(lowered).encode("utf-32-le"), np.uint32)
    doc_starts = np.cumsum([0] + [len(t) + 1 for t in lowered[:-1]])
    word, cjk = _char_tables()
    pos = np.flatnonzero(word[cp])
    chars, is_cjk = cp[pos].astype(U64), cjk[cp[pos]]
    cut = (np.diff(pos) != 1) | is_cjk[1:] | is_cjk[:-1]
    starts = np.flatnonzero(np.concatenate(([True], cut))) if chars.size else np.zeros(0, np.int64)
    ends = np.append(starts[1:], chars.size)
    fwd, inv = _powers(1 << int(chars.size).bit_length())
    prefix = np.concatenate(([U64(0)], np.cumsum(chars * fwd[: chars.size])))
    words = mix64((prefix[ends] - prefix[starts]) * inv[starts])
    # Each document's slice of the character and token arrays: a few hundred lookups, not one per char.
    char_bounds = np.searchsorted(pos, np.append(doc_starts, cp.size))
    word_bounds = np.searchsorted(starts, char_bounds)
    cjk_starts = np.concatenate(([0], np.cumsum(is_cjk[starts])))
    out = []
    for d in range(len(texts)):
        w0, w1 = word_bounds[d], word_bounds[d + 1]
        share = (cjk_starts[w1] - cjk_starts[w0]) / max(w1 - w0, 1)
        if unit == "chars" or (unit == "auto" and w1 > w0 and share >= CJK_CHARS_SHARE):
            out.append((mix64(chars[char_bounds[d]:char_bounds[d + 1]]), True))
        else:
            out.append((words[w0:w1], False))
    return out


def shingle_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the token n-grams (one shingle of all tokens when there are fewer than n)."""
    if tokens.size == 0:
        return tokens
    n = min(n, tokens.size)
    count = tokens.size - n + 1
    weights = mix64(np.arange(1, n + 1, dtype=U64)) | U64(1)  # a distinct odd weight per position
    acc = tokens[:count] * weights[0]
    for k in range(1, n):
        acc += tokens[k : k + count] * weights[k]
    return mix64(acc)


class MinHasher:
    """`permutations` hash functions a*h + b mod 2^64 (odd a), drawn from `seed` identically everywhere."""

    def __init__(self, permutations: int, seed: int):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(0, 1 << 63, permutations, dtype=U64) * U64(2) + U64(1)
        self.b = rng.integers(0, 1 << 63, permutations, dtype=U64) * U64(2)

    def signatures(self, shingles: list[np.ndarray]) -> np.ndarray:
        """(docs, permutations) uint32: the top 32 bits of each permutation's minimum; no empty inputs."""
        flat = np.concatenate(shingles)
        starts = np.cumsum([0] + [s.size for s in shingles[:-1]])
        out = np.empty((self.a.size, len(shingles)), U64)
        tmp = np.empty_like(flat)
        for i in range(self.a.size):  # one 1-D pass per permutation keeps `tmp` small enough for cache
            np.multiply(flat, self.a[i], out=tmp)
            tmp += self.b[i]
            np.minimum.reduceat(tmp, starts, out=out[i])
        return (out.T >> U64(32)).astype(np.uint32)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of row pairs: the share of positions where the two signatures agree."""
    return (sig_a == sig_b).mean(axis=-1)

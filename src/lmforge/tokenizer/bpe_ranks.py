"""tiktoken mergeable ranks from a Hugging Face byte-level BPE, and the check that tiktoken's merge
order gives the same tokens as HF's.

tiktoken merges the adjacent pair whose *concatenation* has the lowest rank; HF merges the pair
listed earliest in `merges`. `mergeable_ranks` derives the ranks and refuses, with
`FastPathUnavailable` naming the merge, any vocabulary where the two orders could differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import pre_tokenizers

from lmforge.tokenizer.tiktoken_regex import FastPathUnavailable

# tiktoken mergeable_ranks, and rank -> our id when the ranks are not our ids (else None).
Ranks = tuple[dict[bytes, int], dict[int, int] | None]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def mergeable_ranks(model: dict[str, Any], added_ids: set[int]) -> Ranks:
    """tiktoken mergeable_ranks for the reachable vocabulary, and rank -> our id (None: the same)."""
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    # Added tokens are split out of the text before the model sees it: not BPE symbols.
    id_of = {_to_bytes(token): i for token, i in vocab.items() if i not in added_ids}
    missing = [b for b in range(256) if bytes([b]) not in id_of]
    if missing:
        raise FastPathUnavailable(f"the vocabulary lacks {len(missing)} of the 256 byte symbols (byte {missing[0]})")
    results = _merge_results(merges, id_of)
    merge_ids = [id_of[r] for r in results]
    # Our ids already follow merge order (lmforge's do): use them as ranks and skip the lookup.
    identity = all(a < b for a, b in zip(merge_ids, merge_ids[1:], strict=False))
    byte_ranks = {bytes([b]): (id_of[bytes([b])] if identity else b) for b in range(256)}
    merge_ranks = {r: (i if identity else 256 + k) for k, (r, i) in enumerate(zip(results, merge_ids, strict=True))}
    ranks = {**byte_ranks, **merge_ranks}
    _check_reachable(id_of, ranks, model.get("ignore_merges", False))
    _check_merge_order(merges, results, ranks)
    return ranks, None if identity else {rank: id_of[token] for token, rank in ranks.items()}


def _to_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF[c] for c in token)
    except KeyError as e:
        raise FastPathUnavailable(f"vocabulary token {token!r} is not in the byte-level alphabet") from e


def _merge_results(merges: Sequence[tuple[str, str]], id_of: dict[bytes, int]) -> list[bytes]:
    """The token bytes each merge creates; refuse a merge creating a token twice or outside the vocab."""
    results: list[bytes] = []
    seen: dict[bytes, int] = {}
    for k, (a, b) in enumerate(merges):
        result = _to_bytes(a + b)
        if any(t not in id_of for t in (_to_bytes(a), _to_bytes(b), result)):
            raise FastPathUnavailable(f"merge {k} ({a!r}, {b!r}) names tokens outside the BPE vocabulary")
        if result in seen:
            raise FastPathUnavailable(
                f"merges {seen[result]} and {k} both create {a + b!r}: a token has two merge priorities"
            )
        seen[result] = k
        results.append(result)
    return results


def _check_reachable(id_of: dict[bytes, int], ranks: dict[bytes, int], ignore_merges: bool) -> None:
    """A vocabulary token no merge creates is never produced, unless ignore_merges emits whole words."""
    unreachable = [t for t in id_of if t not in ranks]
    if unreachable and ignore_merges:
        raise FastPathUnavailable(
            f"ignore_merges=True with {len(unreachable)} tokens no merge creates (e.g. {unreachable[0]!r})"
        )


def _check_merge_order(merges: Sequence[tuple[str, str]], results: list[bytes], ranks: dict[bytes, int]) -> None:
    """Every merged token, BPE-encoded tiktoken's way with only the ranks below its own, must come out
    as exactly the pair HF merges into it: then tiktoken's lowest-rank-result greedy makes the same
    merges as HF's earliest-listed-pair greedy on any text (an induction on the merge steps)."""
    for k, ((a, b), token) in enumerate(zip(merges, results, strict=True)):
        parts = _bpe(token, ranks, below=ranks[token])
        if parts != [_to_bytes(a), _to_bytes(b)]:
            raise FastPathUnavailable(
                f"merge {k} ({a!r}, {b!r}) is not the pair lower-ranked merges produce ({parts}): "
                "tiktoken's rank order would merge differently"
            )


def _bpe(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's byte-pair merge: join the leftmost adjacent pair whose result ranks lowest."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


assert set(bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet()), "GPT-2 byte table changed"

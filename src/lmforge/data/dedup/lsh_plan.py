"""What a MinHash setting will do, before it runs: the LSH S-curve, error rates and memory.

A pair of documents at Jaccard similarity s agrees on one signature position with probability s, so
on all `rows` positions of a band with s^r, and shares at least one of `bands` buckets with
P(s) = 1 - (1 - s^r)^b (the S-curve; its midpoint is near (1/b)^(1/r)). The minhash step then keeps
a candidate pair only when the share of agreeing positions over all b*r reaches the threshold: a
binomial tail. The product is the chance that the pair is clustered; below the threshold that is
the false-positive rate, above it one minus that is the false-negative rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil, comb

DEFAULT_SIMILARITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SIG_BYTES = 4  # one uint32 per permutation (signatures.MinHasher keeps the top 32 bits)
# Reduce, per signed document: the key (8 B) kept throughout, and for the band being processed its
# 64-bit bucket hash, the sort order and the sorted copy (8 B each) plus bucket-start flags (1 B) and
# head indices (8 B). Everything else (edges, clusters) scales with the duplicates, not the corpus.
REDUCE_BYTES_PER_DOC = 8 + 8 + 8 + 8 + 1 + 8
ID_BYTES = 24  # an average document id as a JSON line, for the on-disk estimate


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Chance that a pair at Jaccard `s` shares at least one band bucket."""
    return 1.0 - (1.0 - s**rows) ** bands


def midpoint(bands: int, rows: int) -> float:
    """The similarity near which the S-curve crosses 1/2: (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def verify_probability(s: float, permutations: int, threshold: float) -> float:
    """Chance that at least `threshold` of the positions agree (binomial tail, exact)."""
    need = ceil(threshold * permutations - 1e-9)
    tail = sum(comb(permutations, k) * s**k * (1 - s) ** (permutations - k) for k in range(need, permutations + 1))
    return min(1.0, tail)  # the float sum can round past 1


def cluster_probability(s: float, bands: int, rows: int, threshold: float) -> float:
    """Chance that a pair at Jaccard `s` becomes an edge: a candidate, then verified."""
    return candidate_probability(s, bands, rows) * verify_probability(s, bands * rows, threshold)


def error_rates(
    similarities: Sequence[float], bands: int, rows: int, threshold: float
) -> list[tuple[float, str, float]]:
    """(s, "false positive" or "false negative", rate) per similarity, judged against `threshold`."""
    out = []
    for s in similarities:
        p = cluster_probability(s, bands, rows, threshold)
        out.append((s, "false positive", p) if s < threshold else (s, "false negative", 1.0 - p))
    return out


def memory_estimate(docs: int, bands: int, rows: int) -> dict[str, int]:
    """Bytes for `docs` documents: signatures on disk (memory-mapped by reduce) and reduce RAM peak."""
    signatures = docs * bands * rows * SIG_BYTES
    return {
        "signatures_disk": signatures,
        "map_outputs_disk": signatures + docs * (8 + 4 + ID_BYTES),
        "reduce_ram": docs * REDUCE_BYTES_PER_DOC,
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def format_plan(
    bands: int = 14,
    rows: int = 8,
    threshold: float = 0.75,
    docs: int = 1_000_000,
    similarities: Sequence[float] = DEFAULT_SIMILARITIES,
) -> str:
    """The report `lmforge plan-dedup` prints: S-curve table with bars, error rates, memory."""
    lines = [
        f"MinHash LSH: {bands} bands x {rows} rows = {bands * rows} permutations, verify threshold {threshold}",
        f"S-curve midpoint (1/b)^(1/r) = {midpoint(bands, rows):.3f}",
        "",
        "  Jaccard  P(candidate)  P(clustered)",
    ]
    for s in similarities:
        cand, clus = candidate_probability(s, bands, rows), cluster_probability(s, bands, rows, threshold)
        lines.append(f"  {s:7.2f}  {cand:12.4f}  {clus:12.4f}  {'#' * round(40 * clus)}")
    lines += ["", f"Expected error rates (pairs judged against Jaccard {threshold}):"]
    lines += [f"  at {s:.2f}: {kind} {rate:.2%}" for s, kind, rate in error_rates(similarities, bands, rows, threshold)]
    mem = memory_estimate(docs, bands, rows)
    lines += [
        "",
        f"Memory for {docs:,} documents:",
        f"  signatures on disk      {_human(mem['signatures_disk'])}",
        f"  all map outputs on disk {_human(mem['map_outputs_disk'])}",
        f"  reduce RAM (one band)   {_human(mem['reduce_ram'])} + edges of near-duplicate pairs",
    ]
    return "\n".join(lines)

"""MinHash near-dedup end to end, ours against datasketch, rensa and datatrove, in docs/s on one core.

    OMP_NUM_THREADS=1 .venv/bin/python bench/minhash_speed.py [--docs 3000] [--lang en zh] [--skip datatrove]

Documents (~3.5 KB of UTF-8 each): English draws words from the built-in corpus' word frequencies
(so shingles repeat as in prose), Chinese draws characters Zipf-like from 3,000 common ideographs
with punctuation. 10% of the documents get 1-3 copies with 1-3% of their tokens replaced (Jaccard
>= 0.8 on 5-gram shingles). Every tool runs 14 bands x 8 rows = 112 hashes on 5-gram shingles (words
for English, characters for Chinese), from raw text to the set of removed documents:
- ours: MinHashDedup map (one task) + reduce + load/apply, files in a temp dir;
- datasketch: Python shingling, MinHash.update_batch, MinHashLSH(params=(14, 8)) insert + query,
  union-find keeping the first document;
- rensa: the same shingling, RMinHash.update, RMinHashLSH(num_bands=14) insert + query, union-find;
- datatrove: its four MinHash stages (signature, buckets, cluster, filter) run in this process, with
  `str.split` as word tokenizer: its English tokenizer needs spaCy and its Chinese one jieba, neither
  installed (spaCy would only slow it down). English only.
A family is a document and its planted copies; each family should lose all but one member.
Recall: members removed (at most size - 1 per family) / sum of (size - 1); precision: those / removed.
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lmforge.data.dedup.base import doc_key
from lmforge.data.dedup.minhash import MinHashDedup
from lmforge.data.document import Document

BANDS, ROWS, NGRAM = 14, 8, 5
_WORD = re.compile(r"\w+")


def english_words(seed: int) -> tuple[list[str], list[int]]:
    from lmforge.config import BuiltinCorpusConfig
    from lmforge.data.builtin import iter_builtin_corpus

    counts: Counter[str] = Counter()
    for d in iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=3_000_000, max_code_bytes=0)):
        counts.update(_WORD.findall(d.text))
    common = counts.most_common(20_000)
    return [w for w, _ in common], [c for _, c in common]


def make_docs(lang: str, n: int, seed: int = 0) -> tuple[list[Document], dict[str, str]]:
    """Documents, and the family (base id) of every document that has planted copies."""
    rng = random.Random(seed)
    if lang == "en":
        vocab, weights = english_words(seed)
        sep, length = " ", 560
    else:
        vocab = [chr(0x4E00 + i) for i in range(3000)]
        weights, sep, length = [1 / (i + 10) for i in range(3000)], "", 1150
    docs, family = [], {}
    while len(docs) < n:
        toks = rng.choices(vocab, weights, k=length)
        if lang == "zh":
            toks = [t + rng.choice("，。、") if i % 17 == 16 else t for i, t in enumerate(toks)]
        base = f"{lang}{len(docs)}"
        docs.append(Document(base, sep.join(toks), "bench"))
        for c in range(rng.randint(1, 3) if rng.random() < 0.1 else 0):
            edited = list(toks)
            for _ in range(max(1, int(length * rng.uniform(0.01, 0.03) / NGRAM))):
                edited[rng.randrange(length)] = rng.choice(vocab)
            docs.append(Document(f"{base}c{c}", sep.join(edited), "bench"))
            family[f"{base}c{c}"] = family[base] = base
    rng.shuffle(docs)
    return docs, family


def py_shingles(text: str, lang: str) -> list[str]:
    toks = _WORD.findall(text.lower())
    if lang == "zh":
        toks = list("".join(toks))
    glue = " " if lang == "en" else ""
    return [glue.join(toks[i : i + NGRAM]) for i in range(max(1, len(toks) - NGRAM + 1))]


def cluster_removed(n: int, pairs: list[tuple[int, int]]) -> set[int]:
    """Union-find over candidate pairs; all but the smallest index of each component are removed."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i for i in range(n) if find(i) != i}


def run_ours(docs: list[Document], lang: str, tmp: Path) -> set[str]:
    step = MinHashDedup(max_cluster=None, max_removed_share=None)
    step.map(((doc_key(0, i), d) for i, d in enumerate(docs)), tmp / "map")
    (tmp / "out").mkdir()
    step.reduce([tmp / "map"], tmp / "out")
    decisions = step.load(tmp / "out", 0)
    return {d.id for i, d in enumerate(docs) if step.apply(decisions, doc_key(0, i), d)[0] is None}


def run_datasketch(docs: list[Document], lang: str, tmp: Path) -> set[str]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    sigs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch([s.encode() for s in py_shingles(d.text, lang)])
        lsh.insert(i, m)
        sigs.append(m)
    pairs = [(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i]
    return {docs[i].id for i in cluster_removed(len(docs), pairs)}


def run_rensa(docs: list[Document], lang: str, tmp: Path) -> set[str]:
    from rensa import RMinHash, RMinHashLSH

    lsh = RMinHashLSH(threshold=0.75, num_perm=BANDS * ROWS, num_bands=BANDS)
    sigs = []
    for i, d in enumerate(docs):
        m = RMinHash(num_perm=BANDS * ROWS, seed=1)
        m.update(py_shingles(d.text, lang))
        lsh.insert(i, m)
        sigs.append(m)
    pairs = [(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i]
    return {docs[i].id for i in cluster_removed(len(docs), pairs)}


def run_datatrove(docs: list[Document], lang: str, tmp: Path) -> set[str]:
    from datatrove.data import Document as DtDocument
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    # sha1: datatrove 0.10's xxhash path passes str where xxhash wants bytes (TypeError).
    cfg = MinhashConfig(NGRAM, BANDS, ROWS, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    dt_docs = [DtDocument(text=d.text, id=d.id) for d in docs]
    MinhashDedupSignature(str(tmp / "sigs"), cfg, language=SplitTokenizer()).run(dt_docs, 0, 1)
    for rank in range(BANDS):
        MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=cfg).run(None, rank, BANDS)
    MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "remove"), config=cfg).run(None, 0, 1)
    kept = {d.id for d in MinhashDedupFilter(str(tmp / "remove")).run(dt_docs, 0, 1)}
    return {d.id for d in docs} - kept


TOOLS: dict[str, Callable[[list[Document], str, Path], set[str]]] = {
    "ours": run_ours,
    "datasketch": run_datasketch,
    "rensa": run_rensa,
    "datatrove": run_datatrove,
}


def measure(
    name: str, docs: list[Document], lang: str, family: dict[str, str], rounds: int
) -> tuple[float, float, float]:
    """(docs/s best of rounds, recall, precision)."""
    best = float("inf")
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="lmforge-minhash-bench-") as tmp:
            t0 = time.perf_counter()
            removed = TOOLS[name](docs, lang, Path(tmp))
            best = min(best, time.perf_counter() - t0)
    sizes = Counter(family.values())
    lost = Counter(family[i] for i in removed if i in family)
    hits = sum(min(n, sizes[f] - 1) for f, n in lost.items())
    return len(docs) / best, hits / sum(n - 1 for n in sizes.values()), hits / max(1, len(removed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lang", nargs="+", default=["en", "zh"])
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    MinHashDedup().shingles("warm up the code-point tables")  # a one-off 0.3 s per process
    for lang in args.lang:
        docs, family = make_docs(lang, args.docs)
        kb = sum(d.n_bytes for d in docs) / len(docs) / 1000
        print(f"\n{lang}: {len(docs)} docs, {kb:.1f} KB each, {len(family) - len(set(family.values()))} planted copies")
        results = {}
        for name in TOOLS:
            if name in args.skip or (name == "datatrove" and lang == "zh"):
                continue
            results[name] = measure(name, docs, lang, family, args.rounds)
            rate, rec, prec = results[name]
            print(f"  {name:10s} {rate:9.0f} docs/s  recall {rec:.3f}  precision {prec:.3f}")
        for name, (rate, _, _) in results.items():
            if name != "ours":
                print(f"  ours / {name}: {results['ours'][0] / rate:.1f}x")


if __name__ == "__main__":
    main()

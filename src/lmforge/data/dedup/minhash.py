"""MinHash near-duplicate dedup across shards: signatures per task (map), banded LSH (reduce), apply.

Signatures (tokens, shingles, permutations) are signatures.py's.

Reduce works band by band: one band's hashes of every document are sorted, each bucket's members
become candidate pairs (each with the bucket's smallest key and with its predecessor), and a pair is
kept when the signatures agree on at least `threshold` of their positions (the estimated Jaccard).
Only verified edges are spilled to disk, so memory holds one band at a time. Connected components of
the edges are clusters; the smallest key of each is kept, which depends on the inputs only, never on
how many workers ran the maps or in which order the task directories are listed.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmforge.data.dedup.base import TASK_BITS, DedupAlarm, DedupStep, register_dedup
from lmforge.data.dedup.signatures import U64, MinHasher, batch_token_hashes, mix64, shingle_hashes, similarity
from lmforge.data.document import Document

REASON = "near_duplicate"
UNITS = ("auto", "words", "chars")
BATCH_DOCS = 256  # documents hashed per numpy pass: amortises call overhead, keeps buffers in cache


class Decision(NamedTuple):
    kept_key: int
    kept_id: str
    cluster: int
    similarity: float


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def components(a: np.ndarray, b: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, roots): every node of an edge and its component's smallest-key node (indices into keys)."""
    nodes = np.unique(np.concatenate([a, b]))
    nodes = nodes[np.argsort(keys[nodes], kind="stable")]  # labels are ranks in key order
    rank = np.argsort(nodes)  # the rank of the i-th smallest node index
    by_index = nodes[rank]
    u, v = rank[np.searchsorted(by_index, a)], rank[np.searchsorted(by_index, b)]
    lab = np.arange(nodes.size)
    # Min-label propagation with pointer jumping: a label only falls, always to a node of the same
    # component, so once both ends of every edge agree each component carries its smallest rank.
    while True:
        low = np.minimum(lab[u], lab[v])
        np.minimum.at(lab, u, low)
        np.minimum.at(lab, v, low)
        while not np.array_equal(jumped := lab[lab], lab):
            lab = jumped
        if np.array_equal(lab[u], lab[v]):
            return nodes, nodes[lab]


class _Corpus:
    """Every task's map output, read lazily: signatures memory-mapped, keys in memory (8 B a doc)."""

    def __init__(self, task_dirs: list[Path], permutations: int):
        self.dirs, self.metas = task_dirs, [json.loads((d / "meta.json").read_text()) for d in task_dirs]
        if any(m["permutations"] != permutations for m in self.metas):
            raise ValueError(f"minhash: signatures were not made with {permutations} permutations")
        keys = [np.fromfile(d / "keys.i64", np.int64) for d in task_dirs]
        self.sigs = [_open_sigs(d / "sigs.u32", k.size, permutations) for d, k in zip(task_dirs, keys, strict=True)]
        self.keys = np.concatenate(keys or [np.empty(0, np.int64)])
        self.starts = np.cumsum([0] + [k.size for k in keys])

    def band_candidates(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs sharing this band's bucket: each member with its bucket's smallest key and predecessor."""
        weights = mix64(np.arange(1, hi - lo + 1, dtype=U64))
        parts = [mix64((s[:, lo:hi].astype(U64) * weights).sum(axis=1)) for s in self.sigs]
        band = np.concatenate(parts or [np.empty(0, U64)])
        order = np.lexsort((self.keys, band))
        sorted_band = band[order]
        first = np.concatenate(([True], sorted_band[1:] != sorted_band[:-1]))
        head = np.flatnonzero(first)[np.cumsum(first) - 1]
        member = np.flatnonzero(~first)
        chain = member[~first[member - 1]]  # predecessor is not the head: that edge is already a star edge
        return order[np.concatenate([head[member], chain - 1])], order[np.concatenate([member, chain])]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Signature rows of global document indices, gathered task by task from the memory maps."""
        out = np.empty((idx.size, self.sigs[0].shape[1] if self.sigs else 0), np.uint32)
        task = np.searchsorted(self.starts, idx, side="right") - 1
        for t in np.unique(task):
            sel = task == t
            out[sel] = self.sigs[t][idx[sel] - self.starts[t]]
        return out

    def column(self, name: str, idx: np.ndarray, load: Any) -> list[Any]:
        """Per-document values (read from each task's file `name` by `load`) at global indices."""
        task = np.searchsorted(self.starts, idx, side="right") - 1
        out: list[Any] = [None] * idx.size
        for t in np.unique(task):
            values = load(self.dirs[t] / name)
            for j in np.flatnonzero(task == t):
                out[j] = values[idx[j] - self.starts[t]]
        return out

    def sources(self, idx: np.ndarray) -> list[str]:
        codes = self.column("source.u32", idx, lambda p: np.fromfile(p, np.uint32))
        task = np.searchsorted(self.starts, idx, side="right") - 1
        return [self.metas[t]["sources"][c] for t, c in zip(task, codes, strict=True)]

    def ids(self, idx: np.ndarray) -> list[str]:
        return self.column("ids.jsonl", idx, lambda p: [json.loads(x) for x in p.read_text("utf-8").splitlines()])


def _open_sigs(path: Path, n: int, permutations: int) -> np.ndarray:
    if n == 0:  # numpy cannot memory-map an empty file
        return np.empty((0, permutations), np.uint32)
    return np.memmap(path, np.uint32, "r", shape=(n, permutations))


class _Clusters(NamedTuple):
    removed: np.ndarray  # global indices, sorted by key
    kept: np.ndarray  # the kept document of each removed one
    cluster: np.ndarray  # cluster number: rank of the kept key among all clusters' kept keys
    similarity: np.ndarray  # estimated Jaccard of removed vs kept


def _cluster(corpus: _Corpus, edges: np.ndarray) -> _Clusters:
    nodes, roots = components(edges[0], edges[1], corpus.keys)
    out = nodes != roots
    removed, kept = nodes[out], roots[out]
    cluster = np.unique(corpus.keys[roots], return_inverse=True)[1].reshape(-1)[out]
    sim = similarity(corpus.rows(removed), corpus.rows(kept))
    return _Clusters(removed, kept, cluster, sim)


@register_dedup("minhash")
class MinHashDedup(DedupStep):
    """Near-duplicate removal; one document (the smallest key) is kept per connected cluster."""

    def __init__(
        self,
        shingle_size: int = 5,
        char_shingle_size: int = 5,
        shingle_unit: str = "auto",
        bands: int = 14,
        rows: int = 8,
        threshold: float = 0.75,
        seed: int = 1,
        max_cluster: int | None = 10_000,
        max_removed_share: float | None = 0.5,
        alarm_min_docs: int = 100,
    ):
        """`bands * rows` permutations. threshold: the estimated Jaccard a candidate pair must reach;
        0.75 sits just above the 14 x 8 S-curve's midpoint (1/14)^(1/8) = 0.72, so verification cuts
        the curve's false-positive tail, while a pair at true Jaccard 0.8 still passes 91% of the
        time (112 positions, sd 0.038). max_cluster / max_removed_share are alarms (None turns one
        off): 10k near-copies of one text, or half of a source removed, is far past what near
        duplication of real text does; it is usually templated pages or broken input, which a person
        should look at before the output is written."""
        if shingle_unit not in UNITS:
            raise ValueError(f"minhash: shingle_unit must be one of {UNITS}, got {shingle_unit!r}")
        if min(shingle_size, char_shingle_size, bands, rows) < 1 or not 0 < threshold <= 1:
            raise ValueError("minhash: sizes, bands and rows must be >= 1 and threshold in (0, 1]")
        self.shingle_unit, self.bands, self.rows, self.threshold = shingle_unit, bands, rows, threshold
        self.shingle_size, self.char_shingle_size = shingle_size, char_shingle_size
        self.max_cluster, self.max_removed_share = max_cluster, max_removed_share
        # A share of a handful of documents says nothing: the share alarm watches sources this large.
        self.alarm_min_docs = alarm_min_docs
        self.hasher = MinHasher(bands * rows, seed)

    def shingles(self, text: str) -> np.ndarray:
        return self.batch_shingles([text])[0]

    def batch_shingles(self, texts: list[str]) -> list[np.ndarray]:
        return [shingle_hashes(tokens, self.char_shingle_size if chars else self.shingle_size)
                for tokens, chars in batch_token_hashes(texts, self.shingle_unit)]

    def map(self, docs: Iterable[tuple[int, Document]], out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        sources: dict[str, int] = {}
        counts: Counter[str] = Counter()
        names = ("keys.i64", "sigs.u32", "source.u32", "ids.jsonl")
        with ExitStack() as stack:
            files = [stack.enter_context(open(out / name, "wb")) for name in names]
            for batch in _batches(docs, BATCH_DOCS):
                counts.update(doc.source for _, doc in batch)
                # A document without a single token has nothing to compare; it is always kept.
                shingles = self.batch_shingles([d.text for _, d in batch])
                signed = [(k, d, s) for (k, d), s in zip(batch, shingles, strict=True) if s.size]
                if not signed:
                    continue
                src = [sources.setdefault(d.source, len(sources)) for _, d, _ in signed]
                files[0].write(np.array([k for k, _, _ in signed], np.int64).tobytes())
                files[1].write(self.hasher.signatures([s for _, _, s in signed]).tobytes())
                files[2].write(np.array(src, np.uint32).tobytes())
                files[3].write("".join(json.dumps(d.id) + "\n" for _, d, _ in signed).encode("utf-8"))
        meta = {"permutations": int(self.hasher.a.size), "sources": list(sources), "counts": dict(counts)}
        (out / "meta.json").write_text(json.dumps(meta))

    def reduce(self, task_dirs: list[Path], out: Path) -> dict[str, Any]:
        corpus = _Corpus(task_dirs, int(self.hasher.a.size))
        spill = out / "edges.tmp"
        spill.mkdir(parents=True, exist_ok=True)
        candidates = 0
        for band in range(self.bands):  # memory: one band's hashes and candidates at a time
            a, b = corpus.band_candidates(band * self.rows, (band + 1) * self.rows)
            candidates += a.size
            ok = similarity(corpus.rows(a), corpus.rows(b)) >= self.threshold
            np.save(spill / f"band{band:04d}.npy", np.stack([a[ok], b[ok]]))
        edges = np.concatenate([np.load(p) for p in sorted(spill.glob("*.npy"))], axis=1)
        shutil.rmtree(spill)
        clusters = _cluster(corpus, edges)
        summary = self._summary(corpus, clusters, candidates, edges.shape[1])
        self._check_alarms(summary)  # before a single decision is written
        _write_decisions(corpus, clusters, out)
        return summary

    def _summary(self, corpus: _Corpus, c: _Clusters, candidates: int, verified: int) -> dict[str, Any]:
        docs_by_source: Counter[str] = Counter()
        for meta in corpus.metas:
            docs_by_source.update(meta["counts"])
        sizes = np.bincount(c.cluster) + 1 if c.cluster.size else np.zeros(1, np.int64)
        big = int(np.argmax(sizes))
        kept = c.kept[c.cluster == big][:1]
        return {
            "docs": sum(docs_by_source.values()),
            "signed": int(corpus.keys.size),
            "permutations": int(self.hasher.a.size),
            "candidate_pairs": candidates,
            "verified_pairs": verified,
            "clusters": int(sizes.size) if c.cluster.size else 0,
            "removed": int(c.removed.size),
            "largest_cluster": {
                "cluster": big if kept.size else None,
                "size": int(sizes[big]) if kept.size else 0,
                "kept_key": int(corpus.keys[kept[0]]) if kept.size else None,
                "kept_id": corpus.ids(kept)[0] if kept.size else None,
            },
            "removed_by_source": dict(Counter(corpus.sources(c.removed))),
            "docs_by_source": dict(docs_by_source),
        }

    def _check_alarms(self, summary: dict[str, Any]) -> None:
        big = summary["largest_cluster"]
        if self.max_cluster is not None and big["size"] > self.max_cluster:
            raise DedupAlarm(
                f"minhash: cluster {big['cluster']} (kept document {big['kept_id']!r}) has {big['size']} "
                f"documents, over max_cluster={self.max_cluster}",
                summary,
            )
        for src, removed in summary["removed_by_source"].items():
            total = summary["docs_by_source"][src]
            if (self.max_removed_share is not None and total >= self.alarm_min_docs
                    and removed / total > self.max_removed_share):
                raise DedupAlarm(
                    f"minhash: would remove {removed} of {total} documents ({removed / total:.1%}) of "
                    f"source {src!r}, over max_removed_share={self.max_removed_share}",
                    summary,
                )

    def load(self, out: Path, task: int) -> dict[int, Decision]:
        path = out / f"task{task:06d}.jsonl"
        if not path.exists():
            return {}
        with open(path, encoding="utf-8") as f:
            return {row[0]: Decision(*row[1:]) for row in map(json.loads, f)}

    def apply(
        self, decisions: dict[int, Decision], key: int, doc: Document
    ) -> tuple[Document | None, str, dict[str, Any]]:
        d = decisions.get(key)
        if d is None:
            return doc, "", {}
        return (
            None,
            REASON,
            {"kept_id": d.kept_id, "kept_key": d.kept_key, "cluster": d.cluster, "similarity": d.similarity},
        )


def _write_decisions(corpus: _Corpus, c: _Clusters, out: Path) -> None:
    """One JSON-lines file per task that lost documents: [key, kept key, kept id, cluster, similarity]."""
    keys, kept_keys = corpus.keys[c.removed], corpus.keys[c.kept]
    kept_ids = corpus.ids(c.kept)
    tasks = keys >> TASK_BITS
    for task in np.unique(tasks):
        rows = np.flatnonzero(tasks == task)
        rows = rows[np.argsort(keys[rows])]
        lines = (
            json.dumps(
                [int(keys[j]), int(kept_keys[j]), kept_ids[j], int(c.cluster[j]), round(float(c.similarity[j]), 4)]
            )
            for j in rows
        )
        (out / f"task{int(task):06d}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")

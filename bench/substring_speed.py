"""Exact-substring dedup throughput and memory: map + reduce (suffix array) + apply over a synthetic
corpus with planted duplicates, one core.

    .venv/bin/python bench/substring_speed.py [--mb 100] [--tasks 8] [--min-bytes 100] [--quick]

The corpus is deterministic per task (regenerated for apply rather than held): documents of
Zipf-drawn pseudo-words (10% of them Chinese), lognormal lengths around 2 KB. Planted duplicates:
a third of the documents carry one of 400 boilerplate paragraphs (150-800 bytes) at their start or
end, and 2% are copies of an earlier document of their task. The expected cut is every planted
copy after its first; the measured cut should match it to within a few bytes per copy (a space
next to a paragraph can repeat with it).

The reduce runs in a child process so its peak RSS (ru_maxrss) is its own, not the generator's;
the suffix array (pydivsufsort) and LCP (Kasai) are then timed alone on the same bytes. There is
no installed peer (Google's deduplicate-text-datasets is Rust, not on PyPI), and a naive
pure-Python window scan is not cheap at this size, so no baseline is run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.data.dedup.base import doc_key
from lmforge.data.dedup.substring import PEAK_BYTES_PER_BYTE, SubstringDedup
from lmforge.data.document import Document

LATIN = "abcdefghijklmnopqrstuvwxyz"
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
N_BOILER, BOILER_SHARE, COPY_SHARE, MEAN_DOC = 400, 1 / 3, 0.02, 2000


def vocabulary(rng: np.random.Generator, n: int, chinese: bool) -> np.ndarray:
    if chinese:
        return np.array(["".join(rng.choice(CJK, rng.integers(1, 4))) for _ in range(n)], dtype=object)
    return np.array(["".join(rng.choice(list(LATIN), rng.integers(2, 11))) for _ in range(n)], dtype=object)


def zipf_words(rng: np.random.Generator, vocab: np.ndarray, n: int) -> str:
    ids = np.minimum(rng.zipf(1.1, n), len(vocab)) - 1
    sep = "" if len(vocab[0]) and vocab[0][0] in CJK else " "
    return sep.join(vocab[ids].tolist())


class Corpus:
    """Deterministic documents of one task, with the boilerplate shared by every task."""

    def __init__(self, total_bytes: int, n_tasks: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.latin, self.chinese = vocabulary(rng, 20000, False), vocabulary(rng, 20000, True)
        self.boiler = [zipf_words(rng, self.latin, int(rng.integers(25, 130)))[:800] for _ in range(N_BOILER)]
        self.boilerplate = frozenset(b for b in self.boiler if len(b) >= 150)
        self.boiler = sorted(self.boilerplate)
        self.task_bytes, self.n_tasks, self.seed = total_bytes // n_tasks, n_tasks, seed

    def task(self, t: int) -> Iterator[tuple[int, Document, int]]:
        """(key, document, planted bytes expected to be cut from it)."""
        rng = np.random.default_rng([self.seed, t + 1])
        made, i, texts = 0, 0, []
        while made < self.task_bytes:
            text, expected = self._document(rng, texts)
            texts.append(text)
            made += len(text.encode("utf-8"))
            yield doc_key(t, i), Document(f"t{t}-{i}", text, "web"), expected
            i += 1

    def _document(self, rng: np.random.Generator, earlier: list[str]) -> tuple[str, int]:
        if earlier and rng.random() < COPY_SHARE:
            return earlier[int(rng.integers(len(earlier)))], -1  # -1: the whole document goes
        chinese = rng.random() < 0.1
        n_words = max(20, int(rng.lognormal(np.log(MEAN_DOC / (4 if chinese else 6.5)) - 0.32, 0.8)))  # mean MEAN_DOC
        text = zipf_words(rng, self.chinese if chinese else self.latin, n_words)
        if rng.random() < BOILER_SHARE:
            para = self.boiler[int(rng.integers(len(self.boiler)))]
            text = f"{para} {text}" if rng.random() < 0.5 else f"{text} {para}"
            return text, len(para)
        return text, 0


def reduce_in_child(step: SubstringDedup, dirs: list[Path], out: Path, queue: mp.Queue) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    summary = step.reduce(dirs, out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sa_s, lcp_s = time_suffix_array(dirs)
    queue.put((summary, seconds, base, peak, sa_s, lcp_s))


def time_suffix_array(dirs: list[Path]) -> tuple[float, float]:
    import pydivsufsort

    data = np.frombuffer(bytearray(b"".join((d / "text.bin").read_bytes() for d in dirs)), dtype=np.uint8)
    t0 = time.perf_counter()
    sa = pydivsufsort.divsufsort(data)
    t1 = time.perf_counter()
    pydivsufsort.kasai(data, sa)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (1e6 bytes)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--min-bytes", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="10 MB")
    args = ap.parse_args()
    mb = 10.0 if args.quick else args.mb
    corpus = Corpus(int(mb * 1e6), args.tasks)
    step = SubstringDedup(min_bytes=args.min_bytes)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, one core used")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs, n_bytes, n_docs, expected, gen_s, map_s = map_phase(step, corpus, root)
        print(
            f"corpus: {n_bytes / 1e6:.1f} MB, {n_docs:,} documents in {args.tasks} tasks (generated in {gen_s:.1f} s)"
        )
        print(f"map:    {map_s:6.1f} s  {n_bytes / 1e6 / map_s:8.1f} MB/s")
        out = root / "reduce"
        out.mkdir()
        queue: mp.Queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=reduce_in_child, args=(step, dirs, out, queue))
        child.start()
        summary, red_s, base, peak, sa_s, lcp_s = queue.get()
        child.join()
        print(
            f"reduce: {red_s:6.1f} s  {n_bytes / 1e6 / red_s:8.1f} MB/s  peak RSS {peak / 2**20:,.0f} MiB "
            f"({(peak - base) / n_bytes:.1f} bytes per corpus byte over the {base / 2**20:.0f} MiB start; "
            f"estimate {PEAK_BYTES_PER_BYTE})"
        )
        print(
            f"  suffix array alone {sa_s:.1f} s ({n_bytes / 1e6 / sa_s:.1f} MB/s), "
            f"LCP (Kasai) alone {lcp_s:.1f} s ({n_bytes / 1e6 / lcp_s:.1f} MB/s)"
        )
        apply_s, cut, dropped = apply_phase(step, corpus, out)
        print(f"apply:  {apply_s:6.1f} s  {n_bytes / 1e6 / apply_s:8.1f} MB/s (load + apply, generation excluded)")
        total = map_s + red_s + apply_s
        print(f"total:  {total:6.1f} s  {n_bytes / 1e6 / total:8.1f} MB/s (map + reduce + apply)")
        print(
            f"cut {summary['removed_bytes']:,} bytes in {summary['spans']:,} spans from {summary['docs_cut']:,} "
            f"documents ({dropped:,} dropped); planted duplicates: {expected:,} bytes "
            f"(measured/expected {summary['removed_bytes'] / max(expected, 1):.4f})"
        )


def map_phase(step: SubstringDedup, corpus: Corpus, root: Path) -> tuple:
    """Map each task (timed apart from generating it); returns dirs, bytes, docs, expected cut, times."""
    dirs, n_bytes, n_docs, expected, gen_s, map_s = [], 0, 0, 0, 0.0, 0.0
    seen: set[str] = set()
    for t in range(corpus.n_tasks):
        t0 = time.perf_counter()
        rows = list(corpus.task(t))
        t1 = time.perf_counter()
        d = root / f"task-{t}"
        d.mkdir()
        step.map(((k, doc) for k, doc, _ in rows), d)
        map_s += time.perf_counter() - t1
        gen_s += t1 - t0
        dirs.append(d)
        n_docs += len(rows)
        n_bytes += (d / "text.bin").stat().st_size
        expected += planted_cut(rows, corpus, seen)
    return dirs, n_bytes, n_docs, expected, gen_s, map_s


def planted_cut(rows: list[tuple[int, Document, int]], corpus: Corpus, seen: set[str]) -> int:
    """Bytes of planted copies in one task; `seen` holds the boilerplate met in earlier tasks, whose
    first copy (in corpus order) stays."""
    total = 0
    for _, doc, planted in rows:
        if planted < 0:
            total += len(doc.text.encode("utf-8"))
            continue
        ends = (doc.text[:planted], doc.text[-planted:]) if planted else ()
        para = next((p for p in ends if p in corpus.boilerplate), None)
        if para is not None:
            total += len(para) if para in seen else 0
            seen.add(para)
    return total


def apply_phase(step: SubstringDedup, corpus: Corpus, out: Path) -> tuple[float, int, int]:
    seconds, cut, dropped = 0.0, 0, 0
    for t in range(corpus.n_tasks):
        rows = list(corpus.task(t))
        t0 = time.perf_counter()
        decisions = step.load(out, t)
        for key, doc, _ in rows:
            kept, _, detail = step.apply(decisions, key, doc)
            cut += detail.get("removed_bytes", 0)
            dropped += kept is None
        seconds += time.perf_counter() - t0
    return seconds, cut, dropped


if __name__ == "__main__":
    main()

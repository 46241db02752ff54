"""Peak memory of `lmforge data` as the corpus grows: bounded memory means MB per million documents
falls as the corpus grows (signatures, LSH buckets and digests live on disk, per task).

    .venv/bin/python bench/data_memory.py [--docs 20000 80000] [--files 16] [--workers 1]

Each size runs the stage in a fresh process (`python -m lmforge data`, exact + MinHash dedup, one
min_words rule) on generated ~1 KB English documents with 10% near-duplicates, spread over --files
JSONL files; it reports peak RSS of that process and its workers (ru_maxrss), the growth over the
smallest size, and MB of growth per million documents. There is no peer here: the foundation's
stage held ~250 B per document in one process for exact dedup alone (issue 14).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(5000)]


def write_corpus(root: Path, docs: int, files: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    per_file = -(-docs // files)
    made: list[str] = []
    for f in range(files):
        with open(root / f"part{f:03d}.jsonl", "w", encoding="utf-8") as out:
            for i in range(min(per_file, docs - f * per_file)):
                if made and rng.random() < 0.1:  # a near-duplicate of an earlier document
                    words = rng.choice(made).split()
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                    text = " ".join(words)
                else:
                    text = " ".join(rng.choice(WORDS) for _ in range(180))
                    if len(made) < 2000:
                        made.append(text)
                out.write(json.dumps({"id": f"{f}-{i}", "text": text}) + "\n")


def measure(docs: int, files: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        write_corpus(root / "in", docs, files)
        code = ("import resource, sys; from lmforge.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK', max(resource.getrusage(r).ru_maxrss for r in "
                "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))); sys.exit(rc)")
        args = ["data", "--quiet", f"data.inputs={root / 'in'}", f"out_dir={root / 'run'}", f"data.workers={workers}",
                "data.filters=[{name: min_words, min_words: 20}]", "data.dedup=[exact, minhash]"]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        seconds = time.perf_counter() - start
        peak_kb = int(next(x for x in done.stdout.splitlines() if x.startswith("PEAK")).split()[1])
    return {"docs": docs, "peak_mb": peak_kb / 1024, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, nargs="+", default=[20_000, 80_000])
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"workers {a.workers}, {a.files} files, exact + minhash")
    rows = [measure(n, a.files, a.workers) for n in a.docs]
    base = rows[0]
    for r in rows:
        growth = r["peak_mb"] - base["peak_mb"]
        per_m = growth / ((r["docs"] - base["docs"]) / 1e6) if r["docs"] > base["docs"] else float("nan")
        print(f"{r['docs']:>9,} docs: peak RSS {r['peak_mb']:7.1f} MB, {r['seconds']:6.1f} s, "
              f"{r['docs'] / r['seconds']:7.0f} docs/s; growth over {base['docs']:,}: {growth:6.1f} MB "
              f"({per_m:.0f} MB per million documents)")


if __name__ == "__main__":
    main()

"""`lmforge tokenize` end to end against the bare encoder it wraps, in MB of UTF-8 text per second.

    .venv/bin/python bench/tokenize_speed.py [--mb 15] [--threads 2] [--rounds 3] [--vocab 4096] [--quick] [--profile]

Text: the built-in corpus (standard-library prose and code, all of it), documents repeated with new
ids to --mb megabytes, shuffled and written as the data stage writes them (zstd JSONL document
shards under data/train and data/val, 2% to val). A BPE of --vocab tokens is trained on the whole corpus, once.
"ours" is `stage_tokenize` on that out_dir (after the tokenizer stage's tiktoken export): read the
document shards, encode, write token shards, counts and manifests of both splits. The peer is the
bare encoder the stage uses (`FastEncoder`: tiktoken when it reproduces the tokenizer, else HF
`encode_batch`; special tokens read as text, as the stage does) on the same texts, held in memory,
in three arrangements: "pool", the stage's batches (`doc_batches`) on --threads threads, a call per
text; "joined", the same batches, each in one call with EOS between texts (`encode_joined`, how the
stage calls it); and "batch", the encoder's own parallel call on 1,024-document batches. The peer
is the arrangement with the highest median over the rounds, chosen once: taking the fastest of three
in every round would hand the peer the luckiest of three noisy timings each time (about +3% on a
shared machine when the arrangements are equally fast). Everything runs in this process with
--threads encoder threads. Each stage run starts fresh: the previous round's token sets are deleted
before the clock starts. Rounds are interleaved so a shared machine's noise hits every side. Printed:
the ratio of the best rounds, the ratio of the medians, and the median of the per-round ratios (each
round's stage against the same round's peer). --profile adds a cProfile of one stage run (its main
thread).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

VAL_SHARE = 0.02


def corpus(mb: float, seed: int = 0) -> tuple[list, list[str]]:
    """Documents of about `mb` MB (the corpus repeated with new ids as needed), and the corpus' texts."""
    from lmforge.config import BuiltinCorpusConfig
    from lmforge.data.builtin import iter_builtin_corpus
    from lmforge.data.document import Document

    base = list(iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=10**9, max_code_bytes=10**9)))
    docs, total, copy = [], 0, 0
    while total < mb * 1e6:
        for d in base:
            docs.append(Document(id=f"{d.id}#{copy}", text=d.text, source=d.source))
            total += d.n_bytes
            if total >= mb * 1e6:
                break
        copy += 1
    random.Random(seed).shuffle(docs)
    return docs, [d.text for d in base]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="4 MB, 2 rounds")
    ap.add_argument("--profile", action="store_true", help="also cProfile one stage run (top functions by own time)")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rounds = 4.0, 2
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers starts its thread pool

    from lmforge.config import TokenizerConfig
    from lmforge.data.doc_shards import ShardWriter
    from lmforge.recipe import load_config
    from lmforge.stages import RunPaths, stage_tokenize
    from lmforge.tokenizer.fast_encode import FastEncoder
    from lmforge.tokenizer.special_tokens import load_special_tokens
    from lmforge.tokenizer.tiktoken_file import export_tiktoken
    from lmforge.tokenizer.train import load_tokenizer, train_tokenizer
    from lmforge.tokens.shard_writer import doc_batches

    docs, unique = corpus(args.mb)
    n_val = max(1, int(len(docs) * VAL_SHARE))
    split_docs = {"val": docs[:n_val], "train": docs[n_val:]}
    n_bytes = sum(d.n_bytes for d in docs)
    with tempfile.TemporaryDirectory(prefix="lmforge-tokenize-bench-") as tmp:
        cfg = load_config(overrides=[f"out_dir={tmp}", f"tokens.threads={args.threads}"])
        paths = RunPaths(cfg.out)
        for split, part in split_docs.items():
            with ShardWriter(paths.data / split, docs_per_shard=20_000) as w:  # the data stage's default
                for d in part:
                    w.write(d)
        train_tokenizer(unique, TokenizerConfig(vocab_size=args.vocab), paths.tokenizer,
                        progress=False)
        export_tiktoken(paths.tokenizer)  # as the tokenizer stage does after training

        tok = load_tokenizer(paths.tokenizer)
        eos = load_special_tokens(paths.tokenizer, tok).eos
        encoder = FastEncoder(tok, threads=1, specials_as_text=True)  # as the stage builds it
        pooled = FastEncoder(tok, threads=args.threads, specials_as_text=True)
        batches = [[d.text for d in b] for split in ("train", "val") for b in doc_batches(split_docs[split])]
        big = [[d.text for d in b] for split in ("train", "val") for b in doc_batches(split_docs[split], 1024, 1 << 22)]

        def bare_pool() -> int:  # the stage's arrangement: its batches on --threads workers, in order
            with ThreadPoolExecutor(args.threads) as pool:
                return sum(len(e) for ids in pool.map(encoder.encode_arrays, batches) for e in ids)

        def bare_joined() -> int:  # the same batches, each text followed by EOS, one encoder call per batch
            with ThreadPoolExecutor(args.threads) as pool:
                out = pool.map(lambda texts: encoder.encode_joined(texts, eos), batches)
                return sum(ids.size - len(lengths) for ids, lengths in out)

        def bare_batch() -> int:  # the encoder's own parallel call on 1024-document batches
            return sum(len(e) for texts in big for e in pooled.encode_arrays(texts))

        def ours() -> int:
            out = stage_tokenize(cfg, progress=False)
            return sum(out[s]["n_tokens"] - out[s]["n_docs"] for s in ("train", "val"))  # without the EOS separators

        sides = {"lmforge tokenize (stage)": ours, "bare encoder, pool": bare_pool,
                 "bare encoder, joined": bare_joined, "bare encoder, batch": bare_batch}
        timings: dict[str, list[float]] = {name: [] for name in sides}  # MB/s per round
        tokens = {}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                shutil.rmtree(paths.tokens, ignore_errors=True)  # a fresh run; deleting the last is not tokenizing
                t0 = time.perf_counter()
                tokens[name] = fn()
                timings[name].append(n_bytes / 1e6 / (time.perf_counter() - t0))
        report = ""
        if args.profile:
            prof = cProfile.Profile()
            shutil.rmtree(paths.tokens, ignore_errors=True)
            prof.runcall(ours)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            report = out.getvalue()
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"token counts differ: {tokens}")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus "
          "(shared: other jobs may have been running)")
    print(f"text: {n_bytes / 1e6:.1f} MB, {len(docs):,} documents (of the built-in corpus' {len(unique):,}, "
          "repeated as needed), "
          f"{tokens['bare encoder, pool']:,} tokens with a {args.vocab} BPE; encoder {encoder.backend}, "
          f"{args.threads} threads, "
          f"best of {args.rounds} interleaved rounds")
    stage = timings.pop("lmforge tokenize (stage)")
    peer = max(timings, key=lambda name: statistics.median(timings[name]))
    for name, runs in {"lmforge tokenize (stage)": stage, **timings}.items():
        print(f"{name:26s} best {max(runs):7.2f} MB/s, median {statistics.median(runs):7.2f} MB/s"
              + ("   <- the peer" if name == peer else ""))
    paired = [ours / theirs for ours, theirs in zip(stage, timings[peer], strict=True)]
    print(f"ratio of best rounds:      {max(stage) / max(timings[peer]):.3f} (target >= 0.9)")
    print(f"ratio of medians:          {statistics.median(stage) / statistics.median(timings[peer]):.3f}")
    print(f"per-round ratios, median:  {statistics.median(paired):.3f} (range {min(paired):.3f}-{max(paired):.3f})")
    if report:
        print(f"\n--- cProfile of one stage run, top by own time ---\n{report}")


if __name__ == "__main__":
    main()

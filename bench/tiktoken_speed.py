"""Encode throughput of the tokenize stage: `tokenizers.encode_batch` against the tiktoken fast path
(lmforge.tokenizer.fast_encode), same tokenizer, same thread count, ids checked identical.

    .venv/bin/python bench/tiktoken_speed.py [--mb 15] [--threads 2] [--rounds 3] [--vocab 4096]

Text: the built-in corpus (standard-library prose and code) and Chinese, repeated and shuffled to
--mb megabytes of UTF-8. The Chinese is this machine's zh_CN gettext catalogs (real UI text) when it
has them, else a fixed synthetic mix of common characters; the output says which. A 4k lmforge BPE
is trained on one copy. Both sides encode in the tokenize stage's batches of 1024 documents (with
special tokens read as text, as it does), returning lists of ids; "tiktoken arrays" is the same path
returning uint32 arrays (FastEncoder.encode_arrays). Rounds are interleaved so a shared machine's
noise hits all sides, and the best round of each is kept.
"""

from __future__ import annotations

import argparse
import gettext
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale/zh_CN/LC_MESSAGES")
BATCH_DOCS = 1024  # the tokenize stage's batch (the stage now batches by lmforge.tokens.shard_writer.doc_batches)
HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"


def english() -> list[str]:
    from lmforge.config import BuiltinCorpusConfig
    from lmforge.data.builtin import iter_builtin_corpus

    return [d.text for d in iter_builtin_corpus(BuiltinCorpusConfig())]


def chinese(doc_chars: int = 2000) -> tuple[list[str], str]:
    """Documents of about `doc_chars` characters of Chinese, and where they came from."""
    messages: list[str] = []
    for path in sorted(LOCALE_DIR.glob("*.mo")):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        except (OSError, gettext.Error, UnicodeDecodeError):
            continue
        messages += [v for k, v in catalog.items() if k and isinstance(v, str)]
    source = f"{LOCALE_DIR}/*.mo"
    if sum(map(len, messages)) < 200_000:
        rng = random.Random(0)
        messages = ["".join(rng.choices(HANZI, k=rng.randint(10, 60))) + "。" for _ in range(40_000)]
        source = "synthetic"
    docs, current = [], ""
    for message in messages:
        current += message + "\n"
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
    return docs, source


def corpus(target_bytes: int, seed: int) -> tuple[list[str], list[str], str]:
    """(the shuffled benchmark documents, one copy of the base documents, the Chinese source)."""
    zh, source = chinese()
    base = english() + zh
    base_bytes = sum(len(t.encode("utf-8")) for t in base)
    pool = base * -(-target_bytes // base_bytes)  # enough copies, cut to the target after shuffling
    random.Random(seed).shuffle(pool)
    docs, total = [], 0
    for doc in pool:
        if total >= target_bytes:
            break
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs, base, source


def timed(encode: Callable[[list[str]], list], docs: list[str]) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [ids for i in range(0, len(docs), BATCH_DOCS) for ids in encode(docs[i : i + BATCH_DOCS])]
    return time.perf_counter() - t0, out


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    # tokenizers sizes its rayon pool from this on first use: the same thread count on both sides.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer.fast_encode import FastEncoder
    from lmforge.tokenizer.train import train_tokenizer

    docs, base, source = corpus(int(args.mb * 1e6), seed=0)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(base, TokenizerConfig(vocab_size=args.vocab), Path(tmp) / "tokenizer.json", False)
    fast = FastEncoder(tok, threads=args.threads)
    assert fast.backend == "tiktoken", fast.reason
    tok.encode_special_tokens = True  # as the tokenize stage encodes

    def hf(batch: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]

    sides: dict[str, Callable[[list[str]], list]] = {
        "tokenizers": hf, "tiktoken": fast.encode_batch, "tiktoken arrays": fast.encode_arrays
    }
    best = dict.fromkeys(sides, float("inf"))
    outputs: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, encode in sides.items():
            seconds, outputs[name] = timed(encode, docs)
            best[name] = min(best[name], seconds)
    identical = outputs["tokenizers"] == outputs["tiktoken"] == [a.tolist() for a in outputs["tiktoken arrays"]]
    n_tokens = sum(map(len, outputs["tiktoken"]))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus; {args.threads} threads each")
    print(f"text: {n_bytes / 1e6:.1f} MB, {len(docs):,} docs (built-in corpus + Chinese from {source}), "
          f"{n_tokens:,} tokens, vocab {args.vocab}, best of {args.rounds} interleaved rounds")
    for name in best:
        print(f"{name:>16}: {n_bytes / 1e6 / best[name]:7.2f} MB/s ({best[name]:.2f} s)")
    print(f"ratio tiktoken/tokenizers: {best['tokenizers'] / best['tiktoken']:.2f}x (lists of ids, both sides); "
          f"as uint32 arrays {best['tokenizers'] / best['tiktoken arrays']:.2f}x")
    print(f"ids identical on the whole text: {identical}")
    if not identical:
        raise SystemExit("ids differ")


if __name__ == "__main__":
    main()

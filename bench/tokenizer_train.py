"""Tokenizer training: lmforge's byte-level BPE (train_tokenizer, HF `tokenizers`) against
SentencePiece BPE with byte_fallback, same vocabulary size, same text: training seconds and
bytes/token on held-out text.

    .venv/bin/python bench/tokenizer_train.py [--vocabs 8000 32000] [--threads 2] [--rounds 3] [--mb 0] [--quick]

Text (nothing downloaded): English is the whole built-in corpus (standard-library prose and code,
~13 MB); Chinese is this machine's zh_CN, zh_TW and zh_HK gettext catalogs (translated UI messages,
~3 MB: real Chinese, but short strings, not prose; no installed package here ships Chinese prose),
joined into ~2,000-character documents. 5% of each kind's documents (seeded shuffle) are held out;
the rest, ~15 MB (all of it: nothing is repeated; --mb caps it), trains both tokenizers.

lmforge: TokenizerConfig(kind=bpe, vocab_size=V) defaults (GPT-2 split regex, no normalizer, 113
special/sentinel tokens inside V). SentencePiece: model_type=bpe, vocab_size=V (3 specials and 256
byte pieces inside V), byte_fallback, identity normalization, whitespace kept
(remove_extra_whitespaces=False, allow_whitespace_only_pieces=True), character_coverage 0.9995,
trained on the text's non-blank lines (its unit is a sentence); held-out documents are encoded whole
by both, so SentencePiece spends a byte-fallback token on each newline. Both use --threads threads
(RAYON_NUM_THREADS, num_threads). Training times are the best of --rounds interleaved rounds;
bytes/token (UTF-8 bytes / tokens, no special tokens) come from the first round's models.
"""

from __future__ import annotations

import argparse
import gettext
import io
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LOCALES = [Path(f"/usr/share/locale/{loc}/LC_MESSAGES") for loc in ("zh_CN", "zh_TW", "zh_HK")]
HELD_OUT = 0.05


def chinese(doc_chars: int = 2000) -> list[str]:
    messages: list[str] = []
    for folder in LOCALES:
        for path in sorted(folder.glob("*.mo")):
            try:
                with open(path, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
            except (OSError, gettext.Error, UnicodeDecodeError):
                continue
            messages += [v for k, v in catalog.items() if k and isinstance(v, str)]
    docs, current = [], ""
    for message in messages:
        current += message + "\n"
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


def corpus(seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held-out) texts per kind: prose, code, zh."""
    from lmforge.config import BuiltinCorpusConfig
    from lmforge.data.builtin import iter_builtin_corpus

    kinds: dict[str, list[str]] = {"prose": [], "code": [], "zh": chinese()}
    for d in iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=10**9, max_code_bytes=10**9)):
        kinds[d.source].append(d.text)
    train, held = {}, {}
    rng = random.Random(seed)
    for kind, texts in kinds.items():
        rng.shuffle(texts)
        n = max(1, int(len(texts) * HELD_OUT))
        held[kind], train[kind] = texts[:n], texts[n:]
    return train, held


def cap(texts: list[str], mb: float) -> list[str]:
    """Interleaved kinds' texts up to `mb` MB (0: all)."""
    if mb <= 0:
        return texts
    out, total = [], 0
    for t in texts:
        if total >= mb * 1e6:
            break
        out.append(t)
        total += len(t.encode("utf-8"))
    return out


def nbytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", type=int, nargs="+", default=[8000, 32000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=float, default=0, help="cap the training text (0: all, ~15 MB)")
    ap.add_argument("--quick", action="store_true", help="4 MB of training text, one round")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rounds = 4.0, 1
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers starts its thread pool

    import sentencepiece as spm

    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer.train import train_tokenizer

    train, held = corpus()
    mixed = [t for kind in ("prose", "code", "zh") for t in train[kind]]
    random.Random(1).shuffle(mixed)
    texts = cap(mixed, args.mb)
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    zh_set = set(train["zh"])
    zh_bytes = nbytes([t for t in texts if t in zh_set])

    def ours(vocab: int, tmp: Path) -> Callable[[list[str]], int]:
        cfg = TokenizerConfig(vocab_size=vocab, max_train_bytes=10**10)
        tok = train_tokenizer(texts, cfg, tmp / f"tokenizer-{vocab}.json", progress=False)
        tok.encode_special_tokens = True
        return lambda docs: sum(len(e) for e in tok.encode_batch(docs, add_special_tokens=False))

    def sentencepiece(vocab: int, tmp: Path) -> Callable[[list[str]], int]:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            input_sentence_size=0, num_threads=args.threads, minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        return lambda docs: sum(len(ids) for ids in sp.encode(docs))

    sides = {"lmforge BPE": ours, "SentencePiece BPE": sentencepiece}
    seconds: dict[tuple[str, int], float] = {}
    bpt: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-bench-") as tmp:
        for r in range(args.rounds):
            for vocab in args.vocabs:
                for name, train_fn in sides.items():
                    t0 = time.perf_counter()
                    count = train_fn(vocab, Path(tmp))
                    elapsed = time.perf_counter() - t0
                    seconds[name, vocab] = min(seconds.get((name, vocab), elapsed), elapsed)
                    if r == 0:
                        bpt[name, vocab] = {k: nbytes(docs) / count(docs) for k, docs in held.items()}

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus "
          "(shared: other jobs may have been running)")
    print(f"training text: {nbytes(texts) / 1e6:.1f} MB ({zh_bytes / 1e6:.1f} MB Chinese), {len(texts):,} documents, "
          f"{len(lines):,} non-blank lines; held out: "
          + ", ".join(f"{k} {nbytes(v) / 1e6:.2f} MB" for k, v in held.items()))
    print(f"{args.threads} threads each, training time best of {args.rounds} interleaved rounds")
    print(f"{'tokenizer':18s} {'vocab':>6s} {'train s':>8s}  bytes/token held-out: "
          f"{'prose':>6s} {'code':>6s} {'zh':>6s}")
    for vocab in args.vocabs:
        for name in sides:
            b = bpt[name, vocab]
            print(f"{name:18s} {vocab:6d} {seconds[name, vocab]:8.2f}  {'':22s}"
                  f"{b['prose']:6.3f} {b['code']:6.3f} {b['zh']:6.3f}")
        ours_s, sp_s = seconds["lmforge BPE", vocab], seconds["SentencePiece BPE", vocab]
        ratios = " ".join(f"{k} {bpt['lmforge BPE', vocab][k] / bpt['SentencePiece BPE', vocab][k]:.3f}"
                          for k in ("prose", "code", "zh"))
        print(f"  vocab {vocab}: train time lmforge/SentencePiece {ours_s / sp_s:.2f}; "
              f"bytes/token lmforge/SentencePiece {ratios}")


if __name__ == "__main__":
    main()

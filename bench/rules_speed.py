"""Our Gopher + C4 + FineWeb rule chain against datatrove 0.10's same four filters, on English text.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rules_speed.py [--mb 3] [--rounds 3] [--quick] [--profile]

Text: the built-in corpus' prose (standard-library docstrings and help() topics), repeated with new ids
to --mb megabytes: real English with the short docstrings, code samples and lists that make the rules
disagree at their edges. Both sides run the chain gopher_quality -> gopher_repetition -> c4 -> fineweb
in this process, one core, with the same thresholds (our FineWeb duplicate-line default is 0.1, so
datatrove is given 0.1 too), stopping at the first drop; speed is input MB per second, the best of
interleaved rounds. Agreement is the share of documents both chains keep or both drop, and per filter
the same share with each filter run alone on every document.

datatrove's English word tokenizer is NLTK punkt + Treebank. Punkt's trained English model is a
download from outside the package registries, so datatrove is given the same NLTK code with an
untrained Punkt sentence splitter (`pip install nltk`; no data files). Ours needs neither.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import time
from collections.abc import Callable

FILTER_NAMES = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def corpus(mb: float, doc_bytes: int) -> list[str]:
    """Built-in prose, consecutive texts joined (blank line between) into pages of at least `doc_bytes`,
    repeated as needed to about `mb` MB. Joining makes web-page-sized documents out of docstrings,
    most of which alone are shorter than Gopher's 50 words."""
    from lmforge.config import BuiltinCorpusConfig
    from lmforge.data.builtin import PROSE, iter_builtin_corpus

    cfg = BuiltinCorpusConfig(max_prose_bytes=int(mb * 1e6), max_code_bytes=0)
    base, page = [], []
    for d in iter_builtin_corpus(cfg):
        if d.source == PROSE:
            page.append(d.text)
            if sum(len(t) for t in page) >= doc_bytes:
                base.append("\n\n".join(page))
                page = []
    texts, total = [], 0
    while total < mb * 1e6:
        for t in base:
            texts.append(t)
            total += len(t.encode())
            if total >= mb * 1e6:
                break
    return texts


def ours() -> list[Callable[[str], tuple[bool, str]]]:
    """Our four rules as text -> (kept, text after the rule)."""
    from lmforge.data.document import Document
    from lmforge.data.filters import FILTERS, Rewriter

    def as_step(rule: object) -> Callable[[str], tuple[bool, str]]:
        if isinstance(rule, Rewriter):  # c4 rewrites the text that the next rule sees
            def step(text: str) -> tuple[bool, str]:
                out, _ = rule.process(Document(id="b", text=text, source="web"))
                return (out is not None, out.text if out is not None else text)
        else:
            def step(text: str) -> tuple[bool, str]:
                return rule.keep(Document(id="b", text=text, source="web"))[0], text
        return step

    return [as_step(FILTERS.build(name)) for name in FILTER_NAMES]


def datatrove() -> list[Callable[[str], tuple[bool, str]]]:
    """datatrove's four filters with an NLTK tokenizer that needs no downloaded model."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    class UntrainedPunkt(WordTokenizer):
        def __init__(self) -> None:
            super().__init__("english")
            self.sentences, self.words = PunktSentenceTokenizer(), NLTKWordTokenizer()

        def word_tokenize(self, text: str) -> list[str]:
            return strip_strings([w for s in self.sentences.tokenize(text) for w in self.words.tokenize(s)])

        def sent_tokenize(self, text: str) -> list[str]:
            return strip_strings(self.sentences.tokenize(text))

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return list(self.sentences.span_tokenize(text))

    tok = UntrainedPunkt()
    filters = [
        GopherQualityFilter(language=tok),
        GopherRepetitionFilter(language=tok),
        C4QualityFilter(language=tok),
        FineWebQualityFilter(language=tok, char_duplicates_ratio=0.1),
    ]

    def as_step(f: object) -> Callable[[str], tuple[bool, str]]:
        def step(text: str) -> tuple[bool, str]:
            doc = Document(text=text, id="b")
            verdict = f.filter(doc)
            return verdict is True, doc.text  # C4 rewrites doc.text in place

        return step

    return [as_step(f) for f in filters]


def run_chain(steps: list[Callable[[str], tuple[bool, str]]], texts: list[str]) -> list[bool]:
    kept = []
    for text in texts:
        ok = True
        for step in steps:
            ok, text = step(text)
            if not ok:
                break
        kept.append(ok)
    return kept


def agreement(a: list[bool], b: list[bool]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-bytes", type=int, default=2000, help="join docstrings into pages of at least this")
    ap.add_argument("--quick", action="store_true", help="1 MB, 1 round")
    ap.add_argument("--profile", action="store_true", help="also cProfile one run of our chain")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rounds = 1.0, 1
    texts = corpus(args.mb, args.doc_bytes)
    n_mb = sum(len(t.encode()) for t in texts) / 1e6
    sides = {"lmforge": ours(), "datatrove 0.10": datatrove()}
    best = dict.fromkeys(sides, 0.0)
    kept: dict[str, list[bool]] = {}
    for _ in range(args.rounds):
        for name, steps in sides.items():
            t0 = time.perf_counter()
            kept[name] = run_chain(steps, texts)
            best[name] = max(best[name], n_mb / (time.perf_counter() - t0))
    # Each filter alone on every distinct text, so a disagreement is pinned on one rule.
    unique = list(dict.fromkeys(texts))
    per_filter = {
        name: agreement(*([s(t)[0] for t in unique] for s in (o, d)))
        for name, o, d in zip(FILTER_NAMES, sides["lmforge"], sides["datatrove 0.10"], strict=True)
    }

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, one process "
          "(shared: other jobs may have been running)")
    print(f"text: {n_mb:.1f} MB, {len(texts):,} documents ({len(unique):,} distinct) of built-in English prose "
          f"(pages of >= {args.doc_bytes} B); best of {args.rounds} interleaved rounds")
    for name, mb_s in best.items():
        print(f"{name:16s} {mb_s:7.3f} MB/s per core, keeps {sum(kept[name]) / len(texts):.1%}")
    print(f"speed ratio lmforge/datatrove: {best['lmforge'] / best['datatrove 0.10']:.1f}x (target >= 10x)")
    print(f"same keep/drop decision, chain: {agreement(kept['lmforge'], kept['datatrove 0.10']):.2%} "
          "(target >= 99%)")
    for name, share in per_filter.items():
        print(f"  {name:18s} alone: {share:.2%}")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run_chain, sides["lmforge"], texts)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(f"\n--- cProfile of our chain, top by own time ---\n{out.getvalue()}")


if __name__ == "__main__":
    main()

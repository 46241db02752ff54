"""Learned filters: a linear classifier's score (`quality_classifier`, `toxicity`) and the perplexity of
a small language model that lmforge trained (`perplexity`).

They cost far more per document than the heuristic rules, so a recipe lists them after the cheap
rules: each step only sees what the steps before it kept (a cascade). A classifier loads when its
rule is built, so a missing or corrupt model fails the recipe at once. The language model loads on
first use (torch weights are slow to load, and a process that never scores should not pay for
that); its run directory is still checked when the rule is built.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge.data import textstats
from lmforge.data.classifier import load_classifier
from lmforge.data.document import Document
from lmforge.data.filters.base import OptionError, Rewriter, check_number, register_rule

GRANULARITIES = ("document", "sentence")


class _ClassifierRule(Rewriter):
    """Scores a document (or each sentence) with a `train_classifier` model and drops what `_bad`
    rejects; kept documents get meta[`meta_key`] (at sentence granularity: the mean score of the
    kept sentences, and meta[`meta_key`_sentences_removed])."""

    label: str  # names the score in drop reasons
    relation: str  # how a bad score compares with the threshold, for the reasons

    def __init__(self, path: str, threshold: float, granularity: str, meta_key: str):
        if not isinstance(path, str) or not path:
            raise OptionError("path", f"expected a classifier directory, got {path!r}")
        try:
            self.model = load_classifier(Path(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OptionError("path", str(e)) from e
        if granularity not in GRANULARITIES:
            raise OptionError("granularity", f"expected one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if not isinstance(meta_key, str) or not meta_key:
            raise OptionError("meta_key", f"expected a metadata field name, got {meta_key!r}")
        self.threshold, self.granularity, self.meta_key = threshold, granularity, meta_key

    @abstractmethod
    def _bad(self, score: float) -> bool:
        """Whether text with this score goes."""

    def process(self, doc: Document) -> tuple[Document | None, str]:
        if self.granularity == "sentence":
            return self._by_sentence(doc)
        score = self.model.score(doc.text)
        if self._bad(score):
            return None, f"{self.label}={score:.3f}{self.relation}{self.threshold:g}"
        return replace(doc, meta={**doc.meta, self.meta_key: round(score, 4)}), ""

    def _by_sentence(self, doc: Document) -> tuple[Document | None, str]:
        pieces = sentence_pieces(doc.text)
        if not pieces:
            return None, f"{self.label}: no sentences"
        scores = [self.model.score(p) for p in pieces]
        kept = [(p, s) for p, s in zip(pieces, scores, strict=True) if not self._bad(s)]
        if not kept:
            return None, f"{self.label}: all {len(pieces)} sentences {self.relation}{self.threshold:g}"
        text = "".join(p for p, _ in kept)
        if self._bad(scores[-1]):  # the separator after the last kept sentence now ends the text
            text = text.rstrip()
        meta = {**doc.meta, self.meta_key: round(sum(s for _, s in kept) / len(kept), 4),
                f"{self.meta_key}_sentences_removed": len(pieces) - len(kept)}
        return replace(doc, text=text, meta=meta), ""


def sentence_pieces(text: str) -> list[str]:
    """`text` cut at `textstats.sentences` boundaries, each sentence with the whitespace after it (the
    first with any before it too), so joining any subset in order keeps the original layout."""
    starts, pos = [], 0
    for sentence in textstats.sentences(text):
        pos = text.find(sentence, pos)  # sentences are stripped substrings, in order
        starts.append(pos)
        pos += len(sentence)
    if not starts:
        return []
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


@register_rule("quality_classifier")
class QualityClassifier(_ClassifierRule):
    """Keeps text the classifier at `path` scores at least `min_score` (probability of its positive
    class). `granularity: sentence` removes low-scoring sentences and drops the document only when
    none is left."""

    label, relation = "quality", "<"

    def __init__(self, path: str, min_score: float = 0.5, granularity: str = "document",
                 meta_key: str = "quality_score"):
        super().__init__(path, _probability("min_score", min_score), granularity, meta_key)

    def _bad(self, score: float) -> bool:
        return score < self.threshold


@register_rule("toxicity")
class Toxicity(_ClassifierRule):
    """Drops text the classifier (trained with toxic text as the positive class) scores at least
    `max_score`; at sentence granularity only the toxic sentences go."""

    label, relation = "toxicity", ">="

    def __init__(self, path: str, max_score: float = 0.5, granularity: str = "document",
                 meta_key: str = "toxicity_score"):
        super().__init__(path, _probability("max_score", max_score), granularity, meta_key)

    def _bad(self, score: float) -> bool:
        return score >= self.threshold


def _probability(key: str, value: Any) -> float:
    value = check_number(key, value)
    if value > 1:
        raise OptionError(key, f"is a probability, must be <= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------- perplexity


def resolve_run(path: Path) -> tuple[Path, str]:
    """(run directory, checkpoint directory or "" for its latest) from either of them."""
    if (path / "state.json").is_file():  # <run>/checkpoints/step_N
        return path.parent.parent, str(path)
    if (path / "checkpoints").is_dir():
        return path, ""
    raise FileNotFoundError(f"{path} is neither an lmforge run directory (with checkpoints/) nor a checkpoint "
                            "(with state.json)")


class LMScorer:
    """A trained decoder and its tokenizer, scoring texts on the CPU."""

    def __init__(self, checkpoint: Path):
        from lmforge.recipe import config_from_dict
        from lmforge.run_dir import RunPaths, load_trained
        from lmforge.tokenizer.special_tokens import load_special_tokens
        from lmforge.tokenizer.train import load_tokenizer

        run, ckpt = resolve_run(Path(checkpoint))
        model, _, self.checkpoint = load_trained(config_from_dict({"out_dir": str(run), "eval": {"checkpoint": ckpt}}))
        if model.cfg.family != "decoder":
            raise ValueError(f"{self.checkpoint}: perplexity needs a decoder (next-token) model, "
                             f"this one is {model.cfg.family!r}")
        self.model = model.to("cpu").eval()
        path = RunPaths(run).tokenizer
        self.tokenizer = load_tokenizer(path)
        self.eos = load_special_tokens(path, self.tokenizer).eos

    def perplexity(self, text: str, max_tokens: int) -> tuple[float, int]:
        """(perplexity, tokens scored) of the first `max_tokens` tokens, each predicted from what precedes
        it. An EOS goes first, as training packs one before every document, so the first token is scored
        as a document start. Text past the model's context is scored in fresh windows."""
        import torch  # here, not at the top: every data worker imports the rule registry (~1 s for torch)
        import torch.nn.functional as F

        ids = [self.eos, *self.tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens]]
        window = self.model.cfg.max_seq_len
        nats, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[start : start + window + 1]], dtype=torch.long)
                logits = self.model(chunk[:, :-1])[0].float()
                nats += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
                count += chunk.shape[1] - 1
        return (math.exp(nats / count), count) if count else (math.nan, 0)


@register_rule("perplexity")
class Perplexity(Rewriter):
    """Keeps documents whose perplexity under a small lmforge-trained LM lies in [`min`, `max`]
    (CCNet's idea: very high is noise or another domain, very low is often boilerplate or repeats).
    `checkpoint`: a run directory (its latest checkpoint) or one checkpoint directory inside it.
    `max_tokens`: score at most this many leading tokens. Adds meta["perplexity"]."""

    def __init__(self, checkpoint: str, min: float = 0.0, max: float | None = None, max_tokens: int = 512):
        if not isinstance(checkpoint, str) or not checkpoint:
            raise OptionError("checkpoint", f"expected a run or checkpoint directory, got {checkpoint!r}")
        try:
            resolve_run(Path(checkpoint))
        except FileNotFoundError as e:
            raise OptionError("checkpoint", str(e)) from e
        self.checkpoint = Path(checkpoint)
        self.min_ppl = check_number("min", min)
        self.max_ppl = math.inf if max is None else check_number("max", max, minimum=self.min_ppl)
        self.max_tokens = check_number("max_tokens", max_tokens, integer=True, minimum=1)
        self._scorer: LMScorer | None = None

    @property
    def scorer(self) -> LMScorer:
        if self._scorer is None:
            self._scorer = LMScorer(self.checkpoint)
        return self._scorer

    def process(self, doc: Document) -> tuple[Document | None, str]:
        ppl, n = self.scorer.perplexity(doc.text, self.max_tokens)
        if n == 0:
            return None, "perplexity: no tokens"
        if ppl < self.min_ppl:
            return None, f"perplexity={ppl:.1f}<{self.min_ppl:g}"
        if ppl > self.max_ppl:
            return None, f"perplexity={ppl:.1f}>{self.max_ppl:g}"
        return replace(doc, meta={**doc.meta, "perplexity": round(ppl, 3)}), ""

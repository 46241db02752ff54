"""Language identification with py3langid's shipped model (140 languages, naive Bayes over byte n-grams).

The identifier runs with normalised probabilities (py3langid divides its scores by sqrt(bytes)
before the softmax, so a threshold stays comparable between short and long texts). Its model
is stored as compressed npz read with `allow_pickle=False`, so loading it runs no code.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from lmforge.data.document import Document
from lmforge.data.filters.base import OptionError, Rewriter, check_number, register_rule


@lru_cache(maxsize=1)
def identifier() -> LanguageIdentifier:
    """One identifier per process, made on first use: loading the model takes about half a second,
    and a worker process that never sees a document should not pay it."""
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 0) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of `text`, classifying only its first `max_chars` (0: all)."""
    lang, prob = identifier().classify(text[:max_chars] if max_chars else text)
    return lang, float(prob)


@register_rule("langid")
class LangId(Rewriter):
    """Adds meta["language"] and meta["language_prob"] to every document it keeps.

    `languages`: the codes to keep (None: any language); a document whose best guess is not listed
    drops with "lang=de". `min_prob`: a kept language must be at least this probable, else
    "lang_prob=0.412<0.65" (0.65 is FineWeb's English threshold; 0 only annotates). Text with no
    letters at all gets a uniform, tiny probability, so `min_prob` also drops it.
    `max_chars`: classify a prefix only, as the language of a long page rarely changes past it.
    """

    def __init__(self, languages: list[str] | None = None, min_prob: float = 0.65, max_chars: int = 10_000):
        self.min_prob = check_number("min_prob", min_prob)
        if self.min_prob > 1:
            raise OptionError("min_prob", f"is a probability, must be <= 1, got {min_prob!r}")
        self.max_chars = check_number("max_chars", max_chars, integer=True)
        self.languages = None if languages is None else frozenset(_check_languages(languages))

    def process(self, doc: Document) -> tuple[Document | None, str]:
        lang, prob = identify(doc.text, self.max_chars)
        if self.languages is not None and lang not in self.languages:
            return None, f"lang={lang}"
        if prob < self.min_prob:
            return None, f"lang_prob={prob:.3f}<{self.min_prob:g}"
        return replace(doc, meta={**doc.meta, "language": lang, "language_prob": round(prob, 4)}), ""


def _check_languages(languages: object) -> list[str]:
    if isinstance(languages, str):  # `languages: en` in YAML means the one-element list
        languages = [languages]
    if not isinstance(languages, list) or not languages or not all(isinstance(x, str) for x in languages):
        raise OptionError("languages", f"expected a non-empty list of language codes, got {languages!r}")
    unknown = sorted(set(languages) - set(identifier().labels))
    if unknown:
        raise OptionError("languages", f"unknown to the model: {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(identifier().labels))}")
    return languages

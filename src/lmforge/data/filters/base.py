"""The filter contract, and the step that runs one rule over a document stream.

A rule is a `Filter` (`keep(doc) -> (kept, reason)`), a `Transform` (`apply(doc) -> doc`) or a
`Rewriter` (`process(doc) -> (doc or None, reason)`: rewrites some documents and drops others, as PII
masking does: a few matches are replaced, many drop the document).
Rules never see the ledger or other documents, so any rule runs unchanged in a local process, a
Ray task or a unit test; `FilterStep` adds the source restriction and the ledger bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from lmforge.data.document import Document
from lmforge.data.ledger import Ledger
from lmforge.registry import Registry

FILTERS = Registry("filter")

class Filter(ABC):
    name: ClassVar[str]

    @abstractmethod
    def keep(self, doc: Document) -> tuple[bool, str]:
        """(True, "") to keep; (False, reason) to drop, the reason short and specific ("words=12<25")."""


class Transform(ABC):
    name: ClassVar[str]

    @abstractmethod
    def apply(self, doc: Document) -> Document:
        """A new document with the text (or meta) rewritten; never mutates `doc`."""


class Rewriter(ABC):
    name: ClassVar[str]

    @abstractmethod
    def process(self, doc: Document) -> tuple[Document | None, str]:
        """(doc, "") unchanged or (new_doc, "") rewritten (never mutating `doc`); (None, reason) to drop."""


Rule = Filter | Transform | Rewriter


def register_rule(name: str) -> Callable[[Any], Any]:
    """Register a rule class under `name` and give it that `name`, so the two cannot drift apart."""

    def deco(cls: Any) -> Any:
        cls.name = name
        return FILTERS.register(name)(cls)

    return deco


class OptionError(ValueError):
    """A rule option has a bad value; `build_filter` prefixes the recipe location."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"{key}: {problem}")


def check_number(key: str, value: Any, *, minimum: float = 0.0, integer: bool = False) -> float:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise OptionError(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise OptionError(key, f"must be >= {minimum:g}, got {value!r}")
    return value


class FilterStep:
    """Runs one rule as a pipeline step; documents from sources the rule does not cover pass through.
    `sources` lists the labels it covers (None: all); `skip_sources` the labels it never touches,
    which suits rules meant for prose when the other labels are not known in advance (user data)."""

    def __init__(
        self,
        rule: Rule,
        sources: Iterable[str] | None = None,
        name: str | None = None,
        skip_sources: Iterable[str] = (),
    ):
        self.rule = rule
        self.sources = None if sources is None else frozenset(sources)
        self.skip_sources = frozenset(skip_sources)
        self.name = name or rule.name

    def applies(self, doc: Document) -> bool:
        return (self.sources is None or doc.source in self.sources) and doc.source not in self.skip_sources

    def __call__(self, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]:
        for doc in docs:
            if not self.applies(doc):
                yield doc
            elif isinstance(self.rule, Transform):
                yield self.rule.apply(doc)
            elif isinstance(self.rule, Rewriter):
                new, reason = self.rule.process(doc)
                if new is not None:
                    yield new
                else:
                    ledger.record_removed(doc, self.name, reason)
            else:
                kept, reason = self.rule.keep(doc)
                if kept:
                    yield doc
                else:
                    ledger.record_removed(doc, self.name, reason)

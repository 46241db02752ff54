"""The built-in default corpus: this machine's Python standard library, read as text.

Every machine that runs lmforge has it, offline, with no download: "prose" is the library's
docstrings plus the reference-manual topics behind `help()`, "code" is its source files. Modules
are read and parsed with `ast`, never imported, so no module code runs.
"""

from __future__ import annotations

import ast
import inspect
import os
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import xxhash

from lmforge.config import BuiltinCorpusConfig
from lmforge.data.document import Document

PROSE, CODE = "prose", "code"
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Not code anyone writes: one generated dict holding the help() topics, which "prose" already has.
_NOT_CODE = frozenset({"pydoc_data/topics.py"})
# Fixed, not the run seed: the corpus is a property of the installed Python, so changing the training
# seed must not change the data.
_ORDER_SEED = 0
# A source whose remaining budget is below this takes no more documents (nothing useful fits).
_FULL_BELOW = 256
_TOPIC_PREFIX = "pydoc_data/topics.py:"
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the library's .py files, tests and third-party packages excluded."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def _help_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return dict(topics)


def docstrings(source: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) in source order; "" names the module docstring.

    Walks statements only (defs can sit inside if/try/with blocks), never expressions, so very
    deep expression trees cannot exhaust the stack.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like in old modules
        tree = ast.parse(source)
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, name = stack.pop()
        if isinstance(node, (ast.Module, *_DEF_NODES)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield name, inspect.cleandoc(doc)
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt | ast.excepthandler)]
        for child in reversed(children):
            child_name = f"{name}.{child.name}".lstrip(".") if isinstance(child, _DEF_NODES) else name
            stack.append((child, child_name))


class _Budget:
    def __init__(self, cap: int):
        self.left = cap

    @property
    def full(self) -> bool:
        return self.left < _FULL_BELOW

    def take(self, doc: Document) -> bool:
        """Admit `doc` if it fits; one that does not is skipped so smaller ones can still fill the cap."""
        n = doc.n_bytes
        if n > self.left:
            return False
        self.left -= n
        return True


def iter_builtin_corpus(cfg: BuiltinCorpusConfig) -> Iterator[Document]:
    """Prose and code documents, deterministic for a given Python installation.

    Files and help topics are visited in a fixed pseudo-random order (by a seeded hash of the name)
    so a byte cap samples the whole library instead of its first packages alphabetically.
    """
    root = stdlib_root()
    topics = _help_topics()
    units = stdlib_files(root) + [_TOPIC_PREFIX + key for key in sorted(topics)]
    units.sort(key=lambda u: (xxhash.xxh64_intdigest(u.encode(), seed=_ORDER_SEED), u))
    prose, code = _Budget(cfg.max_prose_bytes), _Budget(cfg.max_code_bytes)
    for unit in units:
        if prose.full and code.full:
            return
        if unit.startswith(_TOPIC_PREFIX):
            doc = Document(id=f"{PROSE}/{unit}", text=topics[unit[len(_TOPIC_PREFIX):]].strip(), source=PROSE)
            if not prose.full and doc.text and prose.take(doc):
                yield doc
            continue
        try:
            text = (root / unit).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not code.full and unit not in _NOT_CODE and text.strip():
            doc = Document(id=f"{CODE}/{unit}", text=text, source=CODE)
            if code.take(doc):
                yield doc
        if not prose.full:
            yield from _file_prose(unit, text, cfg.min_docstring_chars, prose)


def _file_prose(unit: str, text: str, min_chars: int, budget: _Budget) -> Iterator[Document]:
    try:
        found = list(docstrings(text))
    except (SyntaxError, ValueError, RecursionError):  # ValueError: source with NUL bytes
        return
    seen: Counter[str] = Counter()
    for name, doc_text in found:
        if len(doc_text) < min_chars:
            continue
        seen[name] += 1
        # Conditional definitions ("if win32: def f ... else: def f") repeat a name; ids must not.
        suffix = f"#{seen[name]}" if seen[name] > 1 else ""
        doc_id = f"{PROSE}/{unit}:{name}{suffix}" if name else f"{PROSE}/{unit}{suffix}"
        doc = Document(id=doc_id, text=doc_text, source=PROSE)
        if budget.take(doc):
            yield doc

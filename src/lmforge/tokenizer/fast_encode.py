"""A tiktoken fast path for lmforge's byte-level BPE, with the ids `tokenizers` would give.

tiktoken encodes the same regex + byte-level BPE several times faster than `tokenizers`, but its
algorithm is not literally HF's: it merges the adjacent pair whose *concatenation* has the lowest
rank, where HF merges the pair listed earliest in `merges`. The two agree when every token, encoded
with only the ranks below its own, comes out as exactly the pair that created it (BPE training
produces such merges; a hand-edited or converted vocabulary may not). `tiktoken_encoding` checks that for every merge,
and every other configuration detail tiktoken cannot reproduce, and raises `FastPathUnavailable`
naming the reason rather than ever encoding differently. `FastEncoder` uses it when it can and
falls back to `tokenizers.encode_batch` otherwise, saying which and why.

The contract is `Tokenizer.encode_batch(texts, add_special_tokens=False)` with
`encode_special_tokens = specials_as_text`: the tokenize stage encodes a document quoting
"<|endoftext|>" as plain text (specials_as_text=True, the default).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tokenizers import Tokenizer

from lmforge.tokenizer.bpe_ranks import Ranks, mergeable_ranks
from lmforge.tokenizer.tiktoken_regex import (  # noqa: F401 - GPT2_PATTERN is part of this module's API
    GPT2_PATTERN,
    FastPathUnavailable,
    check_no_empty_match,
    tiktoken_pattern,
)

try:
    import tiktoken
except ImportError:  # the fallback still works; FastEncoder reports why it is not fast
    tiktoken = None  # type: ignore[assignment]

_SURROGATE = re.compile("[\ud800-\udfff]")

# Diverse text both encoders must agree on before the fast path is trusted: it catches engine
# differences (regex classes, case folding, whitespace) that the static checks cannot rule out.
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox: I'll, we'VE, it's, DON'T, O'Neil's 'quoted' ''s.",
    "Numbers 1234567890 3.14159 1,000,000 ½ ² ٣ 四 x86_64 v2.0.1-rc1",
    "   leading\t\ttabs  \n\n\n  trailing   \r\n\r\nwindows\r\n \u00a0nbsp\u2028ls\u3000ideo\x85nel\x0b\x0c",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\tif x >= 10 and y != 3: pass\n",
    "大规模语言模型的预训练需要高质量的数据。日本語のテキスト、한국어 텍스트。",
    "emoji 🤗🚀 👩🏽‍💻 👨‍👩‍👧‍👦 🇨🇳🇬🇧 ❤️ e\u0301 a\u0308\u0304 \u200c\u200d \u200f",
    "RTL: مرحبا بالعالم עברית — हिन्दी ภาษาไทย Ελληνικά Кириллица",
    "folds: Straße STRASSE ﬆ ﬁ ſ K İı ǅ ß's 'S 'ſ 'K",
    "controls \x00\x01\x1b[0m\x7f \ufeff\ufffd end",
    "specials <|endoftext|> mid<|pad|>dle x <extra_id_0>y <|endoftext|><|endoftext|>",
    "",
    " ",
    "\n",
)


@dataclass(frozen=True)
class TiktokenPath:
    """A tiktoken Encoding plus how its token values map to our ids (None: they are our ids)."""

    encoding: Any  # tiktoken.Encoding
    to_ours: np.ndarray | None
    special: frozenset[str]
    pattern: str  # the regex tiktoken splits with
    ranks: Ranks
    specials: dict[str, int]  # the added tokens as tiktoken special tokens (content -> value)


def tiktoken_encoding(tokenizer: Tokenizer, name: str = "lmforge", specials_as_text: bool = True) -> Any:
    """The tiktoken.Encoding equivalent to `tokenizer`, or FastPathUnavailable naming why not.

    Its token values are our ids when the vocabulary numbers merged tokens in merge order (every
    tokenizer lmforge trains does); otherwise they are merge-order ranks and `FastEncoder` maps
    them back. Building one needs no download (explicit mergeable_ranks, never get_encoding).
    """
    return build_tiktoken_path(tokenizer, name, specials_as_text).encoding


def build_tiktoken_path(
    tokenizer: Tokenizer, name: str = "lmforge", specials_as_text: bool = True, checked_ranks: Ranks | None = None
) -> TiktokenPath:
    """Check `tokenizer`, build its Encoding and rank -> id table, and verify them on PROBE_TEXTS.

    `checked_ranks`: this tokenizer's ranks as an earlier build derived and checked them (the export
    beside it, `tiktoken_file.py`): the per-merge check, the one cost that grows with the vocabulary,
    is then skipped; every other check and the probe comparison still run.
    """
    if tiktoken is None:
        raise FastPathUnavailable("tiktoken is not installed")
    spec = orjson.loads(tokenizer.to_str())  # ~2x json's speed on a large vocabulary
    _check_pipeline(spec)
    pattern, split_regex = tiktoken_pattern(spec["pre_tokenizer"])
    added = _added_tokens(spec["added_tokens"], specials_as_text)
    ranks, rank_to_id = checked_ranks or mergeable_ranks(spec["model"], {t["id"] for t in spec["added_tokens"]})
    specials, to_ours = _specials_and_table(added, ranks, rank_to_id)
    encoding = _encoding(name, pattern, ranks, specials)
    if split_regex is not None:
        check_no_empty_match(split_regex, PROBE_TEXTS)
    special = frozenset() if specials_as_text else frozenset(added)
    path = TiktokenPath(encoding, to_ours, special, pattern, (ranks, rank_to_id), specials)
    _self_check(path, tokenizer, specials_as_text)
    return path


def exported_path(pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> TiktokenPath:
    """The specials-as-text path of an export whose ranks are our ids, built from what the export
    recorded (no spec to read, no check repeated): the caller checks it against recorded probe ids."""
    encoding = _encoding("lmforge", pattern, ranks, specials)
    return TiktokenPath(encoding, None, frozenset(), pattern, (ranks, None), dict(specials))


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> Any:
    if tiktoken is None:
        raise FastPathUnavailable("tiktoken is not installed")
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:  # fancy-regex could not compile the pattern
        raise FastPathUnavailable(f"tiktoken's regex engine cannot compile the pre-tokenizer regex: {e}") from e


def probe_reference(tokenizer: Tokenizer, specials_as_text: bool = True) -> list[list[int]]:
    """`tokenizers`' ids of PROBE_TEXTS, special tokens read as text or not: what the fast path must give."""
    # The caller's tokenizer when it already reads special tokens this way: a copy costs ~5 ms.
    same_mode = tokenizer.encode_special_tokens == specials_as_text
    return _hf_encode(tokenizer if same_mode else _hf_copy(tokenizer, specials_as_text), list(PROBE_TEXTS))


# ---------------------------------------------------------------- configuration checks


def _check_pipeline(spec: dict[str, Any]) -> None:
    if spec.get("normalizer") is not None:
        raise FastPathUnavailable(f"a normalizer ({spec['normalizer'].get('type')}) is set; tiktoken has none")
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        raise FastPathUnavailable("truncation or padding is enabled; the fast path returns whole encodings")
    model = spec["model"]
    if model.get("type") != "BPE":
        raise FastPathUnavailable(f"the model is {model.get('type')}, not BPE")
    for option in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option) is not None:
            raise FastPathUnavailable(f"BPE {option}={model[option]!r} is set; tiktoken has no such option")
    if model.get("byte_fallback"):
        raise FastPathUnavailable("BPE byte_fallback is set; tiktoken has no such option")


def _added_tokens(tokens: list[dict[str, Any]], specials_as_text: bool) -> dict[str, int]:
    """content -> id of the added tokens; refuse matching rules tiktoken's special-token split lacks."""
    if any(not t["special"] for t in tokens):
        raise FastPathUnavailable("non-special added tokens are matched even in text; only special ones supported")
    added = {t["content"]: t["id"] for t in tokens}
    if specials_as_text:  # encode_special_tokens=True: HF matches none of them, no rule applies
        return added
    for t in tokens:
        flags = [f for f in ("single_word", "lstrip", "rstrip") if t.get(f)]
        if flags:
            raise FastPathUnavailable(f"added token {t['content']!r} has {flags}; tiktoken matches specials exactly")
    if len({t["normalized"] for t in tokens}) > 1:
        raise FastPathUnavailable("added tokens mix normalized and not: HF matches them in two passes")
    # HF takes the longest of the tokens starting at one place; tiktoken's alternation takes any one.
    contents = sorted(added)
    for a, b in zip(contents, contents[1:], strict=False):
        if b.startswith(a):
            raise FastPathUnavailable(f"added token {a!r} is a prefix of {b!r}; tiktoken may match the shorter")
    return added


def _specials_and_table(
    added: dict[str, int], ranks: dict[bytes, int], rank_to_id: dict[int, int] | None
) -> tuple[dict[str, int], np.ndarray | None]:
    """Added tokens as tiktoken specials (our ids, or values past the ranks) and the value -> id table."""
    if rank_to_id is None:
        return dict(added), None
    specials = {content: len(ranks) + k for k, content in enumerate(added)}
    table = np.empty(len(ranks) + len(added), dtype=np.uint32)
    table[list(rank_to_id)] = list(rank_to_id.values())
    table[list(specials.values())] = list(added.values())
    return specials, table


def _self_check(path: TiktokenPath, tokenizer: Tokenizer, specials_as_text: bool) -> None:
    reference = probe_reference(tokenizer, specials_as_text)
    try:
        ours = _tiktoken_encode(path, list(PROBE_TEXTS), threads=1)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        raise FastPathUnavailable(f"tiktoken failed on the probe texts: {type(e).__name__}: {e}") from e
    for text, want, got in zip(PROBE_TEXTS, reference, ours, strict=True):
        if want != got:
            raise FastPathUnavailable(f"tiktoken and tokenizers disagree on the probe text {text[:40]!r}")


# ---------------------------------------------------------------- encoding


def _check_text(texts: Sequence[str]) -> None:
    for k, text in enumerate(texts):
        # An ASCII str (O(1) to ask) cannot hold one; tiktoken would silently replace it with U+FFFD.
        if not text.isascii() and _SURROGATE.search(text):
            raise ValueError(f"text {k} holds a lone surrogate, which is not valid UTF-8; tokenizers refuses it too")


def _tiktoken_encode(path: TiktokenPath, texts: list[str], threads: int) -> list[list[int]]:
    _check_text(texts)
    encoding, allowed = path.encoding, path.special

    def one(text: str) -> list[int]:
        if allowed:
            return encoding.encode(text, allowed_special=allowed, disallowed_special=())
        return encoding.encode_ordinary(text)

    out = _parallel(one, texts, threads)
    if path.to_ours is None:
        return out
    return [path.to_ours[np.asarray(ids, dtype=np.int64)].tolist() for ids in out]


def _tiktoken_arrays(path: TiktokenPath, texts: list[str], threads: int) -> list[np.ndarray]:
    """As _tiktoken_encode, as uint32 arrays: no Python int per token, so less time under the GIL."""
    _check_text(texts)
    encoding, allowed = path.encoding, path.special

    def one(text: str) -> np.ndarray:
        if encoding.special_tokens_set:
            return encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
        # With no specials at all tiktoken's special-token search is slow and finds nothing.
        return np.asarray(encoding.encode_ordinary(text), dtype=np.uint32)

    out = _parallel(one, texts, threads)
    return out if path.to_ours is None else [path.to_ours[ids] for ids in out]


def _tiktoken_joined(path: TiktokenPath, texts: list[str], sep: str) -> tuple[np.ndarray, list[int]] | None:
    """`texts` each followed by the special token `sep`, encoded in one call; None when that would not
    give each text's own ids. tiktoken encodes the pieces between special tokens independently, so the
    one call equals a call per text when every `sep` it matched is one inserted here: no text holds
    `sep`'s own text (counted in the joined string: with no border, no occurrence overlaps or straddles
    a join) and the output holds exactly one `sep` id per text (another special matched across a join
    would have swallowed one)."""
    joined = sep.join(texts) + sep
    if joined.count(sep) != len(texts):
        return None
    ids = path.encoding.encode_to_numpy(joined, allowed_special=path.special | {sep}, disallowed_special=())
    ends = np.flatnonzero(ids == path.specials[sep])
    if ends.size != len(texts):
        return None
    return (ids if path.to_ours is None else path.to_ours[ids]), np.diff(ends, prepend=-1).tolist()


def _border_free(s: str) -> bool:
    """No proper prefix of `s` is also its suffix: two occurrences can never overlap."""
    return all(s[:k] != s[-k:] for k in range(1, len(s)))


def _parallel(fn: Callable[[str], Any], texts: list[str], threads: int) -> list[Any]:
    """`fn` over `texts` in order on `threads` threads. tiktoken releases the GIL while it encodes,
    but a task per text (what its encode_batch does) cost ~12% more CPU in the executor on the
    benchmark, so each task takes a contiguous chunk, eight chunks per thread to even out long texts."""
    if threads <= 1 or len(texts) <= 1:
        return [fn(t) for t in texts]
    step = -(-len(texts) // (threads * 8))
    chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
    with ThreadPoolExecutor(threads) as pool:
        return [out for part in pool.map(lambda chunk: [fn(t) for t in chunk], chunks) for out in part]


def _hf_copy(tokenizer: Tokenizer, specials_as_text: bool) -> Tokenizer:
    """A private copy with the special-token mode set, so the caller's tokenizer is never mutated."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = specials_as_text
    return copy


def _hf_encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    _check_text(texts)
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may run on (Linux), not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class FastEncoder:
    """`encode_batch(texts)` -> our ids, by tiktoken when it reproduces `tokenizer` exactly, else by
    `tokenizers`; `backend` says which and `reason` why."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        threads: int | None = None,
        specials_as_text: bool = True,
        use_tiktoken: bool = True,
        exported: Ranks | str | None = None,
    ) -> None:
        """`exported`: what the tiktoken export beside the tokenizer holds (`tiktoken_file.load_export`):
        its checked ranks, or the reason the fast path was found impossible for this tokenizer."""
        self._start(threads, None)
        try:
            if not use_tiktoken:
                raise FastPathUnavailable("tiktoken was not requested")
            if isinstance(exported, str):
                raise FastPathUnavailable(exported)
            self._path = build_tiktoken_path(tokenizer, specials_as_text=specials_as_text, checked_ranks=exported)
            self.backend, self.reason = "tiktoken", "reproduces this tokenizer exactly"
        except FastPathUnavailable as e:
            self._hf = _hf_copy(tokenizer, specials_as_text)
            self.backend, self.reason = "tokenizers", f"fast path unavailable: {e}"

    @classmethod
    def from_checked_path(cls, path: TiktokenPath, threads: int | None = None) -> FastEncoder:
        """The tiktoken encoder of `path`, already checked against its tokenizer by the caller (the
        export's recorded probe ids): no `tokenizers` object is loaded, so it has no fallback."""
        encoder = cls.__new__(cls)
        encoder._start(threads, path)
        encoder.backend, encoder.reason = "tiktoken", "reproduces this tokenizer exactly, as its export recorded"
        return encoder

    def _start(self, threads: int | None, path: TiktokenPath | None) -> None:
        self.threads = threads or usable_cpus()
        self._path = path
        self._hf: Tokenizer | None = None
        self._separators: dict[int, str | None] = {}

    @property
    def name(self) -> str:
        return f"{self.backend} ({self.reason})"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._path is not None:
            return _tiktoken_encode(self._path, texts, self.threads)
        assert self._hf is not None
        return _hf_encode(self._hf, texts)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """The same ids as uint32 arrays (what ShardWriter.add takes), about 10% faster by tiktoken."""
        if self._path is not None:
            return _tiktoken_arrays(self._path, texts, self.threads)
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def encode_joined(self, texts: list[str], sep_id: int) -> tuple[np.ndarray, list[int]]:
        """Every text's ids followed by `sep_id`, as one uint32 array, and each text's length with its
        separator: `encode_arrays` and a concatenation, in one tiktoken call per batch when `sep_id`
        is a special token (no text holding its text). One call takes the GIL twice per batch
        instead of twice per text, which the tokenize stage's reading thread otherwise delays."""
        sep = self._separator(sep_id)
        if sep is not None and texts:
            _check_text(texts)
            assert self._path is not None
            joined = _tiktoken_joined(self._path, texts, sep)
            if joined is not None:
                return joined
        ids = self.encode_arrays(texts)
        tail = np.array([sep_id], dtype=np.uint32)
        pieces = [x for doc in ids for x in (doc, tail)]
        tokens = np.concatenate(pieces, dtype=np.uint32, casting="unsafe") if pieces else tail[:0]
        return tokens, [len(x) + 1 for x in ids]

    def _separator(self, sep_id: int) -> str | None:
        """The text of the special token with our id `sep_id` when one call can encode around it."""
        if self._path is None:
            return None
        if sep_id not in self._separators:
            path, text = self._path, None
            for content, value in path.specials.items():
                if (value if path.to_ours is None else int(path.to_ours[value])) == sep_id:
                    text = content if _border_free(content) else None
            self._separators[sep_id] = text
        return self._separators[sep_id]

    __call__ = encode_batch



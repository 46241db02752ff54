"""Which pre-tokenizer regexes tiktoken runs exactly as `tokenizers` does.

tokenizers matches with Oniguruma (Ruby syntax), tiktoken with fancy-regex. The two agree on the
constructs listed here (each compared over every code point) and disagree on others; `tiktoken_pattern`
returns the regex tiktoken must run for a byte-level pre-tokenizer, or raises FastPathUnavailable
naming the construct it cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import regex


class FastPathUnavailable(ValueError):
    """tiktoken cannot reproduce this tokenizer's ids exactly; the message names the reason."""


# The regex ByteLevel(use_regex=True) splits with (tokenizers' pre_tokenizers/byte_level.rs).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Escapes whose meaning differs between tokenizers' Oniguruma (Ruby syntax) and tiktoken's
# fancy-regex, or that one of them lacks: \w and \b differ on ZWJ/ZWNJ and vulgar fractions
# (measured over every code point), \h is hex in Ruby, \A \z \G \K \R \X.. exist in one only.
_UNSAFE_ESCAPES = frozenset("wWbBhHRXKGAzZQEyYOoNkg123456789")
# \p{..} names whose members were compared over every code point and agree in both engines: the
# general categories and these scripts. Others (Word, Alnum, InBasicLatin..) are POSIX-like or
# engine-specific.
_CATEGORIES = "L Lu Ll Lt Lm Lo M Mn Mc Me N Nd Nl No P Pc Pd Ps Pe Pi Pf Po S Sm Sc Sk So Z Zs Zl Zp C Cc Cf Co Cn"
_SCRIPTS = "Han Latin Greek Cyrillic Hiragana Katakana Hangul Arabic Hebrew Thai Devanagari Common Inherited"
_SAFE_PROPERTIES = frozenset(f"{_CATEGORIES} {_SCRIPTS}".split())
# Groups both engines read alike; anything else ((?x) flags, (?~absent), named groups) is refused.
_SAFE_GROUPS = ("(?:", "(?=", "(?!", "(?<=", "(?<!", "(?>")
# Under (?i) Oniguruma also matches one character against several (ß ~ "ss", ﬆ ~ "st"); fancy-regex
# never does. These are the ASCII sequences some single character folds to.
_MULTI_FOLDS = ("ss", "st", "ff", "fi", "fl")


def tiktoken_pattern(pre: dict[str, Any] | None) -> tuple[str, str | None]:
    """(the regex tiktoken splits with, the Split regex if any), for the two forms lmforge writes."""
    if pre is None:
        raise FastPathUnavailable("no pre-tokenizer; only byte-level ones are supported")
    if pre.get("type") == "ByteLevel":
        _check_byte_level(pre, use_regex=True)
        return GPT2_PATTERN, None
    steps = pre.get("pretokenizers", [])
    if pre.get("type") != "Sequence" or [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        kinds = [s.get("type") for s in steps] if steps else pre.get("type")
        raise FastPathUnavailable(
            f"pre-tokenizer {kinds} is neither ByteLevel(use_regex=True) nor Sequence([Split, ByteLevel])"
        )
    split, byte_level = steps
    _check_byte_level(byte_level, use_regex=False)
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise FastPathUnavailable(
            f"Split behavior={split.get('behavior')} invert={split.get('invert')}; only Isolated, not inverted"
        )
    if "Regex" not in split.get("pattern", {}):
        raise FastPathUnavailable(f"Split pattern {split.get('pattern')} is a literal string, not a Regex")
    return _isolated_split_pattern(split["pattern"]["Regex"]), split["pattern"]["Regex"]


def _check_byte_level(pre: dict[str, Any], use_regex: bool) -> None:
    if pre.get("add_prefix_space"):
        raise FastPathUnavailable("ByteLevel add_prefix_space=True; tiktoken adds no prefix space")
    if pre.get("use_regex", True) != use_regex:
        raise FastPathUnavailable(f"ByteLevel use_regex={not use_regex} in this position; expected {use_regex}")


def _isolated_split_pattern(pattern: str) -> str:
    """`pattern` as tiktoken must run it to split like Split(Regex(pattern), "isolated").

    tiktoken drops text its regex does not match; HF keeps each gap between matches as a piece. The
    second alternative matches exactly such a gap (characters where `pattern` cannot start), so a
    pattern that does not cover every character still encodes every byte the way HF does.
    """
    _lint_pattern(pattern)
    return f"(?:{pattern})|(?:(?!(?:{pattern}))(?s:.))+"


def check_no_empty_match(pattern: str, probes: Iterable[str]) -> None:
    """An empty match is a zero-length piece: HF drops it, tiktoken's BPE panics on it. Checked with
    the `regex` module on the probe texts (neither engine exposes its matches)."""
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise FastPathUnavailable(f"cannot check the Split regex {pattern!r} for empty matches: {e}") from e
    if any(m.start() == m.end() for text in (*probes, "a", "1", "'") for m in compiled.finditer(text)):
        raise FastPathUnavailable(f"the Split regex {pattern!r} can match the empty string")


def _lint_pattern(pattern: str) -> None:
    """Refuse regex constructs that Oniguruma and fancy-regex read differently or one of them lacks."""
    depth, i = 0, 0  # depth: nesting of [..] classes
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1 : i + 2] in _UNSAFE_ESCAPES:
                raise FastPathUnavailable(f"the regex uses \\{pattern[i + 1]}, which the two engines read differently")
            i += _escape_length(pattern, i)
            continue
        if depth and pattern.startswith("[:", i):
            raise FastPathUnavailable("the regex uses a POSIX class [:..:], Unicode in tokenizers, ASCII in tiktoken")
        if c in "[]":
            depth = depth + 1 if c == "[" else max(depth - 1, 0)
        elif not depth:
            _check_outside_class(pattern, i)
        i += 1


def _escape_length(pattern: str, at: int) -> int:
    """Length of the escape at `at`; a \\p{..} class is one escape, checked against the safe names."""
    if pattern[at + 1 : at + 2] not in ("p", "P"):
        return 2
    if pattern[at + 2 : at + 3] != "{":
        raise FastPathUnavailable("the regex uses \\p without braces; write \\p{..}")
    end = pattern.find("}", at)
    name = pattern[at + 3 : end]
    if end < 0 or name.removeprefix("^") not in _SAFE_PROPERTIES:
        raise FastPathUnavailable(f"the regex uses \\p{{{name}}}, not checked to mean the same in both engines")
    return end + 1 - at


def _check_outside_class(pattern: str, at: int) -> None:
    c = pattern[at]
    if c in "^$":
        raise FastPathUnavailable(f"the regex uses {c!r}: a line anchor in tokenizers, a text anchor in tiktoken")
    if pattern.startswith("{,", at):
        raise FastPathUnavailable("the regex uses {,n}: {0,n} in tokenizers, literal text in tiktoken")
    if not pattern.startswith("(?", at):
        return
    if pattern.startswith("(?i:", at):
        _check_case_insensitive(pattern, at)
    elif not pattern.startswith(_SAFE_GROUPS, at):
        raise FastPathUnavailable(f"the regex uses the group {pattern[at : at + 4]!r}..; only {_SAFE_GROUPS} agree")


def _check_case_insensitive(pattern: str, at: int) -> None:
    """(?i:..) only around plain ASCII alternatives (like cl100k's contractions): on classes and
    non-ASCII the engines' case folding differs, and Oniguruma matches one character for some
    letter pairs (ß for "ss"), which fancy-regex never does."""
    end = pattern.find(")", at)
    body = pattern[at + 4 : end]
    if end < 0 or not body.isascii() or any(c in body for c in "\\[(."):
        raise FastPathUnavailable(f"(?i:{body}..) holds more than ASCII literals; case folding differs between engines")
    folds = [f for f in _MULTI_FOLDS if f in body.lower()]
    if folds:
        raise FastPathUnavailable(f"under (?i) tokenizers matches one character for {folds} (ß ~ ss), tiktoken not")

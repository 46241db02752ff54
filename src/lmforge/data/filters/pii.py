"""PII masking (the seeds' rule after Dolma): emails, IP addresses, phone numbers, Chinese resident IDs.

A document with at most `max_mask` matches (all kinds together) gets each one replaced by a
placeholder; one with `min_drop` or more is dropped (defaults 5 and 6, the seeds' rule; `max_mask`
defaults to `min_drop - 1`). Counts in between, when the two options leave a gap, keep the text as
it is and only record the counts in meta: a flag-only mode for audits (`max_mask: 0`).

Boundaries are explicit lookarounds on ASCII letters and digits, never `\\b`: Python's `\\b` treats
CJK characters as word characters, so `至x@163.com` or `手机13812345678` would be missed. All
patterns use `re.ASCII`, so full-width digits are not matched (normalise first if they matter).

What is accepted, and why:
- Email: a local part, `@`, dot-separated labels and a top-level domain that is either two
  letters (a country code) or a common generic one. An open-ended `[a-z]{2,}` TLD would turn code
  such as `x@self.weight` into an email; `@property` and `a@b` never match (no local part or dot).
- IPv4: four octets <= 255 without leading zeros, not inside a longer dotted run (versions, OIDs).
- IPv6: candidates validated by `ipaddress`; they must hold a decimal digit, which keeps `a::b`
  and C++/Rust paths out and lets text without digits skip the scan.
- Phones: `+CC` international numbers (7-15 digits in all), mainland mobiles `1[3-9]x xxxx xxxx`
  (optional `+86`/`86`, 3-4-4 with one kind of separator), North American `(555) 123-4567` /
  `555-123-4567`, and Chinese landlines `020-12345678` / `(0755)12345678`. A bare run of digits
  is a phone only as an 11-digit mobile, so 10-digit timestamps and 12-digit order numbers pass.
- Resident ID (GB 11643, 18 digits): the first two digits must be a province-level code (11-15,
  21-23, 31-37, 41-46, 50-54, 61-65, 71, 81-83; 83 is the Taiwan residents' permit); only those two
  digits of the region are checked. The birth date (digits 7-14) must be a real date from 1900 to
  today, and the ISO 7064 MOD 11-2 check digit must match. One that fails any check is not PII.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from lmforge.data.document import Document
from lmforge.data.filters.base import OptionError, Rewriter, check_number, register_rule

EMAIL, IP, PHONE, ID = "EMAIL_ADDRESS", "IP_ADDRESS", "PHONE_NUMBER", "ID_NUMBER"

# Generic TLDs common in real addresses; any two-letter TLD (a country code) is accepted as well.
_GENERIC_TLDS = frozenset({
    "com", "net", "org", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "mobi", "aero", "asia",
    "jobs", "museum", "travel", "coop", "tel", "xyz", "top", "online", "site", "tech", "store", "app", "dev",
    "cloud", "club", "shop", "email", "live", "life", "world", "today", "space", "website", "blog", "news",
    "design", "agency", "company", "network", "digital", "media", "group", "solutions", "services",
})  # fmt: skip
_ID_PROVINCES = frozenset(
    [*range(11, 16), *range(21, 24), *range(31, 38), *range(41, 47), *range(50, 55), *range(61, 66), 71, 81, 82, 83]
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_CN_AREA = r"0(?:10|2[0-9]|[3-9][0-9]{2})"
# Not glued to ASCII letters/digits, nor continuing a dash/dot-separated run of digits.
_START = r"(?<![A-Za-z0-9_])(?<![0-9][.-])"
_END = r"(?![A-Za-z0-9_]|[.-][0-9])"

_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![A-Za-z0-9_(-])",
    re.ASCII,
)
_IPV4_RE = re.compile(rf"(?<![A-Za-z0-9_.]){_OCTET}(?:\.{_OCTET}){{3}}(?![A-Za-z0-9_]|\.[0-9])", re.ASCII)
_IPV6_RE = re.compile(r"(?<![A-Za-z0-9_:.])[0-9A-Fa-f]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?![A-Za-z0-9_])", re.ASCII)
_ID_RE = re.compile(r"(?<![A-Za-z0-9_])[1-9][0-9]{16}[0-9Xx](?![A-Za-z0-9_])", re.ASCII)
_PHONE_RES = tuple(
    re.compile(p, re.ASCII)
    for p in (
        # International: +CC, an optional (area), then digit groups with one kind of separator, so
        # "+1 (555) 123-4567 555-0100" stops before the second number.
        r"(?<![A-Za-z0-9_+])\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?[ .-]?[0-9]+"
        r"(?:(?: [0-9]+){1,5}|(?:-[0-9]+){1,5}|(?:\.[0-9]+){1,5})?(?![A-Za-z0-9_]|[.-]?[0-9])",
        # Mainland mobile; the backreference keeps the 3-4-4 separators consistent.
        rf"(?<![A-Za-z0-9_+.])(?:(?:\+|00)?86[ -]?)?1[3-9][0-9]([ -]?)[0-9]{{4}}\1[0-9]{{4}}{_END}",
        # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-1234.
        rf"{_START}(?:1[ .-])?(?:\([0-9]{{3}}\) ?|[0-9]{{3}}[.-])[0-9]{{3}}[.-][0-9]{{4}}{_END}",
        # Chinese landline with area code and an optional extension.
        rf"{_START}(?:\({_CN_AREA}\) ?|{_CN_AREA}-)[1-9][0-9]{{6,7}}(?:-[0-9]{{1,4}})?{_END}",
    )
)


@dataclass(frozen=True)
class PiiSpan:
    start: int
    end: int
    kind: str


def _emails(text: str) -> Iterator[PiiSpan]:
    for m in _EMAIL_RE.finditer(text):
        tld = m.group(1).lower()
        if len(tld) == 2 or tld in _GENERIC_TLDS:
            yield PiiSpan(m.start(), m.end(), EMAIL)


def _ipv4s(text: str) -> Iterator[PiiSpan]:
    for m in _IPV4_RE.finditer(text):
        yield PiiSpan(m.start(), m.end(), IP)


def _ipv6s(text: str) -> Iterator[PiiSpan]:
    for m in _IPV6_RE.finditer(text):
        # A sentence may end right after an address ("... at fe80::1."): the stop is not part of it.
        cand = m.group().rstrip(".:")
        if cand.count(":") >= 2 and any(c.isdigit() for c in cand) and _is_ipv6(cand):
            yield PiiSpan(m.start(), m.start() + len(cand), IP)


def _is_ipv6(cand: str) -> bool:
    try:
        ipaddress.IPv6Address(cand)
    except ValueError:
        return False
    return True


def _phones(text: str) -> Iterator[PiiSpan]:
    for pattern in _PHONE_RES:
        for m in pattern.finditer(text):
            number = _e164_prefix(m.group())
            if number:
                yield PiiSpan(m.start(), m.start() + len(number), PHONE)


def _e164_prefix(s: str) -> str:
    """`s` less trailing digit groups until it has at most 15 digits (the E.164 cap), or "" below 7.

    Only the international pattern is open-ended: space-separated groups can run into a year or a
    count that follows the number ("+44 20 7946 0958 2024").
    """
    while sum(c.isdigit() for c in s) > 15 and " " in s:
        s = s[: s.rindex(" ")]
    return s if 7 <= sum(c.isdigit() for c in s) <= 15 else ""


def _ids(text: str) -> Iterator[PiiSpan]:
    for m in _ID_RE.finditer(text):
        if valid_resident_id(m.group()):
            yield PiiSpan(m.start(), m.end(), ID)


def valid_resident_id(s: str, today: datetime.date | None = None) -> bool:
    """True for an 18-character resident ID with a known province, a real birth date and a matching check digit."""
    if len(s) != 18 or not s[:17].isdigit() or int(s[:2]) not in _ID_PROVINCES:
        return False
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not datetime.date(1900, 1, 1) <= born <= (today or datetime.date.today()):
        return False
    total = sum(int(d) * w for d, w in zip(s[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == s[17].upper()


def _scanners(text: str) -> list[Callable[[str], Iterator[PiiSpan]]]:
    """The scans worth running: every kind needs an '@' or a digit, so most prose costs two lookups."""
    has_digit = any(c in text for c in "0123456789")
    scans: list[Callable[[str], Iterator[PiiSpan]]] = [_emails] if "@" in text else []
    if has_digit:
        scans += [_phones, _ids]
        if "." in text:
            scans.append(_ipv4s)
        if ":" in text:
            scans.append(_ipv6s)
    return scans


def find_pii(text: str) -> list[PiiSpan]:
    """Non-overlapping matches in text order; of overlapping ones the earliest, then the longest, wins."""
    found = sorted((s for scan in _scanners(text) for s in scan(text)), key=lambda s: (s.start, -s.end))
    spans: list[PiiSpan] = []
    for s in found:
        if not spans or s.start >= spans[-1].end:
            spans.append(s)
    return spans


def mask(text: str, spans: list[PiiSpan]) -> str:
    parts: list[str] = []
    pos = 0
    for s in spans:
        parts += [text[pos : s.start], f"[{s.kind}]"]
        pos = s.end
    parts.append(text[pos:])
    return "".join(parts)


@register_rule("pii")
class Pii(Rewriter):
    """Masks up to `max_mask` PII matches per document and drops documents with `min_drop` or more.

    A rewritten document records what was found in `meta["pii"]` ({"EMAIL_ADDRESS": 2, ...}).
    """

    def __init__(self, min_drop: int = 6, max_mask: int | None = None):
        """`max_mask` defaults to `min_drop - 1`, so setting `min_drop` alone moves both thresholds."""
        self.min_drop = check_number("min_drop", min_drop, integer=True, minimum=1)
        if max_mask is None:
            max_mask = self.min_drop - 1
        self.max_mask = check_number("max_mask", max_mask, integer=True)
        if self.max_mask >= self.min_drop:
            raise OptionError("max_mask", f"must be < min_drop ({self.min_drop}), got {max_mask!r}")

    def process(self, doc: Document) -> tuple[Document | None, str]:
        text, counts = self._mask_until_clean(doc.text)
        n = counts.total()
        if n == 0:
            return doc, ""
        if n >= self.min_drop:
            return None, f"pii={n}>{self.min_drop - 1}"
        return replace(doc, text=text if n <= self.max_mask else doc.text, meta={**doc.meta, "pii": dict(counts)}), ""

    def _mask_until_clean(self, text: str) -> tuple[str, Counter[str]]:
        """Masks and rescans until nothing is left or there is more than `max_mask` to mask.

        A match's edge is a letter or digit and its placeholder ends in a bracket, so masking can
        expose a neighbour that was glued to it ("x@163.com+13812345678"); rescanning makes the
        output clean, so running the step twice finds nothing the second time.
        """
        counts: Counter[str] = Counter()
        spans = find_pii(text)
        while spans:
            counts.update(s.kind for s in spans)
            if counts.total() > self.max_mask:
                break
            text = mask(text, spans)
            spans = find_pii(text)
        return text, counts

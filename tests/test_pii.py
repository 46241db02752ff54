"""The `pii` step: each kind found and masked (next to Chinese too), thresholds, false positives."""

from __future__ import annotations

import datetime
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.data.filters import build_filter
from lmforge.data.filters.pii import Pii, find_pii, valid_resident_id
from lmforge.data.ledger import Ledger

# GB 11643's own worked example, with an 'X' check digit.
GOOD_ID = "11010519491231002X"


def doc(text: str, **meta) -> Document:
    return Document(id="d", text=text, source="web", meta=meta)


def found(text: str) -> list[tuple[str, str]]:
    return [(text[s.start : s.end], s.kind) for s in find_pii(text)]


def with_check_digit(first17: str) -> str:
    """An independent oracle: the MOD 11-2 weights are 2^(17-i) mod 11, the digit (12 - sum) mod 11."""
    total = sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(first17))
    value = (12 - total % 11) % 11
    return first17 + ("X" if value == 10 else str(value))


# ---------------------------------------------------------------- each kind


@pytest.mark.parametrize(
    ("text", "pii", "kind"),
    [
        ("mail me at jane.doe+news@example.co.uk today", "jane.doe+news@example.co.uk", "EMAIL_ADDRESS"),
        ("请发邮件至x@163.com联系", "x@163.com", "EMAIL_ADDRESS"),
        ("Contact: ADMIN@Mail.Example.ORG.", "ADMIN@Mail.Example.ORG", "EMAIL_ADDRESS"),
        ("server at 192.168.1.254, port 22", "192.168.1.254", "IP_ADDRESS"),
        ("IP:8.8.8.8", "8.8.8.8", "IP_ADDRESS"),
        ("服务器地址10.0.0.1已停用", "10.0.0.1", "IP_ADDRESS"),
        ("route 2001:db8:85a3::8a2e:370:7334 now", "2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
        ("link-local fe80::1.", "fe80::1", "IP_ADDRESS"),
        ("映射地址::ffff:10.1.2.3。", "::ffff:10.1.2.3", "IP_ADDRESS"),
        ("手机13812345678联系", "13812345678", "PHONE_NUMBER"),
        ("电话：+86 139-1234-5678。", "+86 139-1234-5678", "PHONE_NUMBER"),
        ("call 86 150 1234 5678 now", "86 150 1234 5678", "PHONE_NUMBER"),
        ("call +1 (555) 123-4567 now", "+1 (555) 123-4567", "PHONE_NUMBER"),
        ("London +44 20 7946 0958 in 2024", "+44 20 7946 0958", "PHONE_NUMBER"),
        ("Paris +33 1 23 45 67 89", "+33 1 23 45 67 89", "PHONE_NUMBER"),
        ("office (555) 123-4567", "(555) 123-4567", "PHONE_NUMBER"),
        ("office 555-123-4567.", "555-123-4567", "PHONE_NUMBER"),
        ("toll free 1-800-555-1234", "1-800-555-1234", "PHONE_NUMBER"),
        ("座机020-12345678转", "020-12345678", "PHONE_NUMBER"),
        ("深圳(0755)87654321", "(0755)87654321", "PHONE_NUMBER"),
        (f"身份证号{GOOD_ID}。", GOOD_ID, "ID_NUMBER"),
        (f"id {GOOD_ID.lower()} ok", GOOD_ID.lower(), "ID_NUMBER"),
    ],
)
def test_each_kind_is_found_and_masked(text: str, pii: str, kind: str):
    assert found(text) == [(pii, kind)]
    out, reason = Pii().process(doc(text))
    assert reason == "" and out is not None
    assert out.text == text.replace(pii, f"[{kind}]")
    assert out.meta["pii"] == {kind: 1}


def test_mixed_document_records_counts_and_leaves_the_input_alone():
    text = f"a@b.com 与 c@d.cn，IP 1.2.3.4，手机13912345678，证件{GOOD_ID}"
    original = doc(text, url="u")
    out, _ = Pii().process(original)
    assert out is not None
    assert out.text == "[EMAIL_ADDRESS] 与 [EMAIL_ADDRESS]，IP [IP_ADDRESS]，手机[PHONE_NUMBER]，证件[ID_NUMBER]"
    assert out.meta == {"url": "u", "pii": {"EMAIL_ADDRESS": 2, "IP_ADDRESS": 1, "PHONE_NUMBER": 1, "ID_NUMBER": 1}}
    assert original.text == text and original.meta == {"url": "u"}


def test_masking_rescans_what_a_glued_neighbour_hid():
    # "+" after "com" is glued to the email, so the phone shows only once the email is masked.
    out, _ = Pii().process(doc("x@163.com+13812345678"))
    assert out is not None
    assert out.text == "[EMAIL_ADDRESS][PHONE_NUMBER]"
    assert out.meta["pii"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}


def test_document_without_pii_is_returned_as_is():
    d = doc("Nothing to see here, version 3.2.1 released on 2024-01-15.")
    assert Pii().process(d) == (d, "")


# ---------------------------------------------------------------- thresholds


def emails(n: int) -> str:
    return " ".join(f"user{i}@example.com" for i in range(n))


def test_five_are_masked_six_drop():
    out, _ = Pii().process(doc(emails(5)))
    assert out is not None and out.text == " ".join(["[EMAIL_ADDRESS]"] * 5)
    assert Pii().process(doc(emails(6))) == (None, "pii=6>5")
    assert Pii().process(doc(emails(3) + " 1.2.3.4 13812345678 555-123-4567")) == (None, "pii=6>5")


def test_min_drop_alone_moves_both_thresholds():
    rule = build_filter({"name": "pii", "min_drop": 2}, 0).rule
    out, _ = rule.process(doc(emails(1)))
    assert out is not None and out.text == "[EMAIL_ADDRESS]"
    assert rule.process(doc(emails(2))) == (None, "pii=2>1")


def test_thresholds_are_configurable_and_the_gap_only_records_counts():
    rule = build_filter({"name": "pii", "max_mask": 1, "min_drop": 3}, 0).rule
    out, _ = rule.process(doc(emails(1)))
    assert out is not None and out.text == "[EMAIL_ADDRESS]"
    out, _ = rule.process(doc(emails(2)))  # above max_mask, below min_drop: flagged, not masked
    assert out is not None and out.text == emails(2) and out.meta["pii"] == {"EMAIL_ADDRESS": 2}
    assert rule.process(doc(emails(3))) == (None, "pii=3>2")


def test_drop_is_recorded_in_the_ledger_by_the_step(tmp_path):
    step = build_filter({"name": "pii", "min_drop": 2}, 0)
    with Ledger(tmp_path / "removed.jsonl") as ledger:
        kept = list(step([doc(emails(1)), Document("x", emails(2), "web")], ledger))
        assert ledger.counts("pii", "web").docs_removed == 1
    assert [d.text for d in kept] == ["[EMAIL_ADDRESS]"]
    record = json.loads((tmp_path / "removed.jsonl").read_text())
    assert (record["id"], record["step"], record["reason"]) == ("x", "pii", "pii=2>1")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"max_mask": 5, "min_drop": 5}, "max_mask"),
        ({"min_drop": 0}, "min_drop"),
        ({"max_mask": -1}, "max_mask"),
        ({"max_mask": 2.5}, "max_mask"),
        ({"min_drop": True}, "min_drop"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str):
    with pytest.raises(ConfigError, match=rf"data\.filters\[0\]\.{key}:"):
        build_filter({"name": "pii", **options}, 0)


# ---------------------------------------------------------------- resident ID validation


def test_id_check_digit_oracle_agrees_with_the_standard_example():
    assert with_check_digit(GOOD_ID[:17]) == GOOD_ID
    assert valid_resident_id(GOOD_ID)


@pytest.mark.parametrize(
    ("first17", "valid"),
    [
        ("44030420000229123", True),  # leap day in a leap year
        ("44030419000229123", False),  # 1900 was not a leap year
        ("44030420230229123", False),
        ("44030419990230123", False),  # no 30 February
        ("44030419991301123", False),  # month 13
        ("44030418991231123", False),  # before 1900
        ("81000019991231123", True),  # Hong Kong residence permit
        ("83000019991231123", True),  # Taiwan residence permit
        ("20030419991231123", False),  # 20: not a province code
        ("99030419991231123", False),
        ("16030419991231123", False),
    ],
)
def test_id_needs_a_province_and_a_real_birth_date(first17: str, valid: bool):
    number = with_check_digit(first17)
    assert valid_resident_id(number) is valid
    assert found(f"号码{number}。") == ([(number, "ID_NUMBER")] if valid else [])


def test_id_with_a_wrong_check_digit_is_not_pii():
    for wrong in "0123456789X":
        if wrong != GOOD_ID[-1]:
            assert not valid_resident_id(GOOD_ID[:17] + wrong)
            assert found(f"id {GOOD_ID[:17]}{wrong} end") == []


def test_id_birth_date_may_not_be_in_the_future():
    number = with_check_digit("11010520300101123")
    assert not valid_resident_id(number)
    assert valid_resident_id(number, today=datetime.date(2031, 1, 1))


# ---------------------------------------------------------------- false positives


@pytest.mark.parametrize(
    "text",
    [
        "upgrade to v2.10.3 or 1.2.3.4.5 (not 10.0.19041.1); python 3.11.4",
        "OID 1.3.6.1.4.1.311 and build v1.2.3.4",
        "dated 2024-01-15, 2024/01/15 12:30:45, 15.01.2024, 2024年1月15日 08:30",
        "timestamps 2024-01-15T12:30:45+08:00 and 12:30:45.123Z, UTC+8",
        "prices $1,234.56, ¥12,800, €99.99, 1,234,567 units, +100.5%, -3.2%",
        "ISBN 978-7-111-54493-7, ISBN 0-306-40615-2, ISBN 9787111544937, ISBN-10 7111544932",
        "created 1700000000, order 202401150001, tracking 123456789012345",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8, md5 d41d8cd98f00b204e9800998ecf8427e",
        "MAC 00:1A:2B:3C:4D:5E, fingerprint 16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48",
        "@property\ndef name(self): return a@b\ny = x@self.weight + z@w.to(device) @ W.T\nfoo@bar",
        "std::vector<int> v; a::b::c(); Vec::new(); 10:30 and 1:2:3",
        "math 3 +5 = 8, 1e+10, 2^32 = 4294967296, id 12345678901, 1.5e-3",
        "user@localhost and root@host-1 and 身份证11010519491231002",
    ],
)
def test_no_false_positives(text: str):
    assert found(text) == []


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="0123456789@", blacklist_categories=("Cs",))))
def test_text_without_digits_or_at_is_unchanged(text: str):
    d = doc(text)
    assert Pii().process(d) == (d, "")


FRAGMENTS = [
    "x@163.com", "Jane.Doe@mail.example.org", "192.168.0.1", "2001:db8::1", "::ffff:1.2.3.4",
    "13812345678", "+86 138 1234 5678", "+1 (555) 123-4567", "555-123-4567", "020-12345678", GOOD_ID,
    "v2.10.3", "2024-01-15", "12:30:45", "$1,234.56", "@property", "a@b", "联系", "至", " ", ".", ",",
    "-", ":", "+", "(", ")", "0", "7", "abc", "X",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12))
def test_masking_is_idempotent(parts: list[str]):
    out, _ = Pii(max_mask=100, min_drop=101).process(doc("".join(parts)))
    assert out is not None
    assert find_pii(out.text) == []

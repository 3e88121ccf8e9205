"""Quality gate: every planted problem found exactly, false-positive traps left alone, fixers exact and idempotent."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import FrozenInstanceError

import pytest

from tunesmith.data.quality import (
    PII_KINDS, QUALITY_KINDS, Finding, boilerplate, find_pii, fix_unicode, mask, normalize_whitespace, redact_pii,
    remove_control_chars, strip_markup, text_issues,
)
from tunesmith.errors import DataError


def kinds_and_texts(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.text) for f in findings]


# Each planted sample with exactly what must be found in it, in order.
QUALITY_SAMPLES = {
    "Le cafÃ© est ouvert.": [("mojibake", "Ã©")],
    "It doesnâ€™t work": [("mojibake", "â€™")],
    "â€œquotedâ€\x9d and Ã¼ber": [("mojibake", "â€œ"), ("mojibake", "â€\x9d"), ("mojibake", "Ã¼")],
    "broken \ufffd\ufffd bytes and ï¿½ too": [("mojibake", "\ufffd\ufffd"), ("mojibake", "ï¿½")],
    "Chinese read as latin-1: ä¸\xadæ–‡, emoji ðŸ˜€": [
        ("mojibake", "ä¸\xadæ–‡"), ("mojibake", "ðŸ˜€")],
    "voilÃ  tout": [("mojibake", "Ã ")],
    "<p>Hello</p><br/>": [("markup", "<p>"), ("markup", "</p>"), ("markup", "<br/>")],
    '<a href="https://x.org" target=_blank>link</a>': [("markup", '<a href="https://x.org" target=_blank>'),
                                                      ("markup", "</a>")],
    "Tom &amp; Jerry&nbsp;&#39;s &#x27;show&#x27;": [("markup", "&amp;"), ("markup", "&nbsp;"), ("markup", "&#39;"),
                                                    ("markup", "&#x27;"), ("markup", "&#x27;")],
    "Answer.<|im_end|>\n<|im_start|>user": [("markup", "<|im_end|>"), ("markup", "<|im_start|>")],
    "x<!-- hidden <b>note</b> -->y<script>var a = 1 < 2;</script>": [
        ("markup", "<!-- hidden <b>note</b> -->"), ("markup", "<script>var a = 1 < 2;</script>")],
    "<doc><title>T</title></doc> <input type=checkbox checked>": [
        ("markup", "<doc>"), ("markup", "<title>"), ("markup", "</title>"), ("markup", "</doc>"),
        ("markup", "<input type=checkbox checked>")],
    "zero\u200bwidth\x00nul\x1b[0m \ufeffbom\x7f \u2060": [
        ("control_chars", "\u200b"), ("control_chars", "\x00"), ("control_chars", "\x1b"),
        ("control_chars", "\ufeff"), ("control_chars", "\x7f"), ("control_chars", "\u2060")],
    "stray\u200djoiner and C1\x85": [("control_chars", "\u200d"), ("mojibake", "\x85")],
}

PII_SAMPLES = {
    "Mail john.doe+ml@example.co.uk or JANE@Mail.Example.com.": [
        ("email", "john.doe+ml@example.co.uk"), ("email", "JANE@Mail.Example.com")],
    "Call +44 20 7946 0958, (555) 123-4567, 555-123-4567, +1-202-555-0143 or 020 7946 0958.": [
        ("phone", "+44 20 7946 0958"), ("phone", "(555) 123-4567"), ("phone", "555-123-4567"),
        ("phone", "+1-202-555-0143"), ("phone", "020 7946 0958")],
    "Visa 4111 1111 1111 1111, Amex 378282246310005, MC 5555-5555-5555-4444.": [
        ("card", "4111 1111 1111 1111"), ("card", "378282246310005"), ("card", "5555-5555-5555-4444")],
    "Pay to GB82 WEST 1234 5698 7654 32 or DE89370400440532013000 (BE68 5390 0754 7034 EUR).": [
        ("iban", "GB82 WEST 1234 5698 7654 32"), ("iban", "DE89370400440532013000"), ("iban", "BE68 5390 0754 7034")],
    "From 192.168.1.20 and 10.0.0.1; v6 fe80::1ff:fe23:4567:890a and 2001:db8::8a2e:370:7334.": [
        ("ip", "192.168.1.20"), ("ip", "10.0.0.1"), ("ip", "fe80::1ff:fe23:4567:890a"),
        ("ip", "2001:db8::8a2e:370:7334")],
    "aws AKIAIOSFODNN7EXAMPLE gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 slack xoxb-123456789012-abcdefghij": [
        ("secret", "AKIAIOSFODNN7EXAMPLE"), ("secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("secret", "xoxb-123456789012-abcdefghij")],
    "openai sk-proj-abc123def456ghi789jkl012 stripe sk_live_abcdefghijklmnop1234 google "
    "AIzaSyA1234567890abcdefghijklmnopqrstuv": [
        ("secret", "sk-proj-abc123def456ghi789jkl012"), ("secret", "sk_live_abcdefghijklmnop1234"),
        ("secret", "AIzaSyA1234567890abcdefghijklmnopqrstuv")],
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U": [
        ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")],
    "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234567890abcdef\n-----END RSA PRIVATE KEY-----\nbye": [
        ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234567890abcdef\n-----END RSA PRIVATE KEY-----")],
    "password=hunter2hunter2 api_key: 'abcd1234efgh' \"DB_PASSWORD\": \"s3cr3t-pa55\" token = Zx9-Qw8-Er7": [
        ("secret", "hunter2hunter2"), ("secret", "abcd1234efgh"), ("secret", "s3cr3t-pa55"), ("secret", "Zx9-Qw8-Er7")],
}

# Realistic texts that must come out clean: nothing from text_issues, nothing from find_pii.
CLEAN_TRAPS = [
    "Released on 2024-01-15T10:30:00Z; planned for 15.01.2025 and 1999-2004.",  # dates and years
    "Costs €1.299,00, $1,234,567.89 or 1 234 567 890 ₽ (about 45%).",  # prices
    "Needs Python 3.11.4, numpy 1.26.0 and version 1.2.3.4 of the driver; build 10.0.19041.1.",  # versions
    "ISBN 978-0-306-40615-7, also written 9780306406157.",  # ISBN-like numbers
    "Order 4111 1111 1111 1112 and id 4111111111111112 are not cards.",  # Luhn-failing 16 digits
    "Order #123456789012 shipped; call ext. 4567 or room 555 1234.",  # plain long numbers, short numbers
    "if (a<b && c>d) return x<=3; so a < b and c > d, x<3, a<b and c>d.",  # maths and comparisons
    "Use List<String>, Vec<u8>, Option<T>, Foo<A> and std::vector<int> v; a::b.",  # generics in code
    "Press <Enter> to continue, then replace <your name> and <username>.",  # placeholders in prose
    "Hello 👋🏽 family 👨\u200d👩\u200d👧\u200d👦, I ❤️ it!",  # emoji with ZWJ sequences
    "中文文本，日本語のテキスト、한국어 문장입니다。",  # CJK
    "Größenänderung über Äpfel — naïve café «déjà vu», Ñandú, Ōsaka, Ürün.",  # German, other accents
    "Привет, мир! Россия и Сербия. می\u200cخواهم",  # Cyrillic, Persian with its ZWNJ
    "# Title\n\n**bold** and _it_ [link](https://x.org) `code`\n> quote\n\n```py\nx = 1\n```",  # Markdown
    "AT&T and R&D; fish&chips; user@localhost and @mention and logo@2x.png.",  # ampersands and at signs
    "Coords 51.5074, -0.1278; ratio 16:9 at 10:30:45; MAC 00:1a:2b:3c:4d:5e.",  # colons and decimals
    "Listen on 0.0.0.0 or 127.0.0.1 with netmask 255.255.255.0; 256.1.1.1 is no address.",  # non-personal addresses
    "The token: Authentication tokens expire. Password: must be 8+ chars. tokenizer_name: meta-llama/Llama-2-7b",
    "password = os.getenv('DB_PASSWORD'); DB_PASSWORD=${DB_PASS}; token = self.token; sk-learn is scikit-learn",
    "ASIA is a continent; ©2024 Acme™ — all rights reserved®.",
]


def test_findings_are_frozen_and_the_kinds_are_fixed():
    finding = Finding("email", 0, 3, "a@b")
    with pytest.raises(FrozenInstanceError):
        finding.kind = "phone"
    assert QUALITY_KINDS == ("mojibake", "markup", "control_chars")
    assert PII_KINDS == ("email", "phone", "card", "iban", "ip", "secret")


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("text", list(QUALITY_SAMPLES))
def test_text_issues_finds_exactly_the_planted_problems(text):
    findings = text_issues(text)
    assert kinds_and_texts(findings) == QUALITY_SAMPLES[text]
    assert all(text[f.start:f.end] == f.text for f in findings)


@pytest.mark.parametrize("text", list(PII_SAMPLES))
def test_find_pii_finds_exactly_the_planted_data(text):
    findings = find_pii(text)
    assert kinds_and_texts(findings) == PII_SAMPLES[text]
    assert all(text[f.start:f.end] == f.text for f in findings)
    assert all(a.end <= b.start for a, b in zip(findings, findings[1:]))  # sorted, non-overlapping


def test_offsets_point_into_the_checked_text():
    text = "Hi Ã© <b>x</b> mail a@b.io"
    assert [(f.kind, f.start, f.end) for f in text_issues(text)] == [
        ("mojibake", 3, 5), ("markup", 6, 9), ("markup", 10, 14)]
    assert find_pii(text) == [Finding("email", 20, 26, "a@b.io")]


@pytest.mark.parametrize("text", CLEAN_TRAPS)
def test_false_positive_traps_are_not_flagged(text):
    assert text_issues(text) == [] and find_pii(text) == []


def test_overlaps_prefer_the_more_specific_longer_match():
    # A card is not also a phone; an IBAN is not read as a card; a secret wins over the card, email or IP inside it.
    assert kinds_and_texts(find_pii("card +4111111111111111")) == [("card", "4111111111111111")]
    assert kinds_and_texts(find_pii("iban NL91ABNA0417164300")) == [("iban", "NL91ABNA0417164300")]
    assert kinds_and_texts(find_pii("password=4111111111111111 token: admin@example.com secret=10.1.2.3x")) == [
        ("secret", "4111111111111111"), ("secret", "admin@example.com"), ("secret", "10.1.2.3x")]


def test_iban_with_a_bad_check_digit_or_unknown_country_is_not_an_iban():
    assert find_pii("GB83 WEST 1234 5698 7654 32 and QQ82 WEST 1234 5698 7654 32") == []


# --------------------------------------------------------------------------------------------------- mask


@pytest.mark.parametrize("finding, masked", [
    (Finding("email", 0, 0, "john.doe@example.com"), "j***@e***.com"),
    (Finding("phone", 0, 0, "+44 20 7946 0958"), "+** ** **** **58"),
    (Finding("phone", 0, 0, "(555) 123-4567"), "(***) ***-**67"),
    (Finding("card", 0, 0, "4111-1111-1111-1234"), "**** **** **** 1234"),
    (Finding("iban", 0, 0, "GB82 WEST 1234 5698 7654 32"), "GB****************5432"),
    (Finding("ip", 0, 0, "10.0.0.1"), "10.*.*.*"),
    (Finding("ip", 0, 0, "2001:db8::1"), "2001:*:*:*"),
    (Finding("secret", 0, 0, "AKIAIOSFODNN7EXAMPLE"), "AKIA… (20 chars)"),
    (Finding("control_chars", 0, 0, "\x00"), "\\u0000"),
    (Finding("markup", 0, 0, "<p>"), "<p>"),
])
def test_mask_hides_all_but_a_hint(finding, masked):
    assert mask(finding) == masked


# -------------------------------------------------------------------------------------------------- fixers


def test_fix_unicode_repairs_mojibake_and_normalizes_to_nfc_but_keeps_style():
    assert fix_unicode("Le cafÃ© â€œniceâ€\x9d, voilÃ  tout") == "Le café “nice”, voilà tout"
    assert fix_unicode("ä¸\xadæ–‡ ðŸ˜€ \x93smart\x94") == "中文 😀 “smart”"
    assert fix_unicode("le\u0301 ﬁ Ｆ &amp;") == "l\u00e9 ﬁ Ｆ &amp;"  # NFC; ligature, width, entity kept
    assert fix_unicode("Grüße, 中文, 😀") == "Grüße, 中文, 😀"


def test_strip_markup_removes_tags_entities_and_script_bodies_but_keeps_comparisons():
    html = "<p>Hello &amp; <b>welcome</b></p><script>alert(1)</script><style>p{}</style>a < b, x<3<|im_end|>"
    assert strip_markup(html) == "\nHello & welcome\na < b, x<3"
    assert strip_markup("&lt;p&gt;x&lt;/p&gt; Tom&nbsp;&#39;s <!-- c --><br/>") == "\nx\n Tom\xa0's \n"
    assert strip_markup("a < b and c > d; List<String>") == "a < b and c > d; List<String>"


def test_normalize_whitespace_collapses_runs_and_blank_lines_but_keeps_indentation():
    text = "  Hello   world \t\n\n\n\nnext\tline  \n    indented  code  \r\nend  \n\n"
    assert normalize_whitespace(text) == "Hello world\n\nnext\tline\n    indented code\nend"


def test_remove_control_chars_keeps_newlines_tabs_and_emoji_joiners():
    text = "a\x00b\u200bc\ufeffd\r\ne\tf\x85g 👨\u200d👩 x\u200dy\rz"
    assert remove_control_chars(text) == "abcd\ne\tfg 👨\u200d👩 xy\nz"


def test_redact_pii_replaces_with_placeholders_and_counts_by_kind():
    text = "Mail a@b.io or c@d.org, call +1-202-555-0143, pay 4111 1111 1111 1111, password=hunter2hunter2"
    redacted, counts = redact_pii(text)
    assert redacted == "Mail [EMAIL] or [EMAIL], call [PHONE], pay [CARD], password=[SECRET]"
    assert counts == Counter(email=2, phone=1, card=1, secret=1)
    only_email, email_counts = redact_pii(text, kinds=["email"])
    assert only_email == ("Mail [EMAIL] or [EMAIL], call +1-202-555-0143, pay 4111 1111 1111 1111, "
                          "password=hunter2hunter2")
    assert email_counts == Counter(email=2)
    with pytest.raises(DataError, match="unknown PII kind"):
        redact_pii(text, kinds=["emails"])


def test_redact_pii_also_catches_what_a_placeholder_frees():
    # The phone is glued to the card; once the card is a placeholder the phone stands alone and goes too.
    assert redact_pii("4111 1111 1111 1111+44 20 7946 0958") == ("[CARD][PHONE]", Counter(card=1, phone=1))


ALL_SAMPLES = list(QUALITY_SAMPLES) + list(PII_SAMPLES) + CLEAN_TRAPS


@pytest.mark.parametrize("fixer", [fix_unicode, strip_markup, normalize_whitespace, remove_control_chars,
                                   lambda t: redact_pii(t)[0]], ids=["fix_unicode", "strip_markup",
                                   "normalize_whitespace", "remove_control_chars", "redact_pii"])
def test_every_fixer_is_idempotent_on_every_sample(fixer):
    for text in ALL_SAMPLES:
        once = fixer(text)
        assert fixer(once) == once, repr(text)


def test_fixed_text_has_no_issues_left_and_placeholders_are_not_found_again():
    for text in list(QUALITY_SAMPLES) + CLEAN_TRAPS:
        cleaned = normalize_whitespace(remove_control_chars(strip_markup(fix_unicode(text))))
        assert [f for f in text_issues(cleaned) if f.text.strip("\ufffd")] == [], repr(text)
    for text in PII_SAMPLES:
        redacted, counts = redact_pii(text)
        assert sum(counts.values()) == len(PII_SAMPLES[text])
        assert find_pii(redacted) == [] and text_issues(redacted) == []


# --------------------------------------------------------------------------------------------- boilerplate


def test_boilerplate_counts_rows_not_lines_and_skips_whole_row_repeats():
    disclaimer = "This message is confidential and meant for its recipient only."
    newsletter = "Subscribe to our newsletter for weekly updates!"
    texts = [
        f"Hi Ann,\nthe invoice is attached.\n{disclaimer}\n{disclaimer}",  # twice in one row: one row
        f"Hello Bob,\nmeeting moved to Monday.\n{disclaimer}",
        f"Dear team,\nsee the notes below.\n  {disclaimer}  ",
        f"Thanks,\nthe report is late again.\n{disclaimer}",
        disclaimer,  # a whole-row repeat is a duplicate, not boilerplate
        f"Our prices drop in May. {newsletter}",
        f"New colours are in store. {newsletter} See you soon.",
        f"Shipping is free this week. {newsletter}",
        "Thanks,\nthe report is late again.\nCheers",  # appears in two rows only
        "Short.\nThanks,",
    ]
    assert boilerplate(texts) == [(disclaimer, 4), (newsletter, 3)]
    assert boilerplate(texts, min_share=0.4) == [(disclaimer, 4)]
    assert boilerplate(texts, min_rows=2) == [(disclaimer, 4), (newsletter, 3), ("the report is late again.", 2)]
    assert boilerplate(texts, min_chars=100) == []


# ----------------------------------------------------------------------------------------------- cost


def test_module_does_not_import_torch():
    code = "import sys, tunesmith.data.quality; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_long_texts_stay_linear():
    text = "Le cafÃ© <b>x</b> a@b.io 10.0.0.1 " * 2000
    started = time.perf_counter()
    assert Counter(f.kind for f in text_issues(text)) == Counter(mojibake=2000, markup=4000)
    assert Counter(f.kind for f in find_pii(text)) == Counter(email=2000, ip=2000)
    assert fix_unicode(text) == text.replace("Ã©", "é")
    assert time.perf_counter() - started < 30  # quadratic diffs or overlap checks would take minutes


def test_checking_ten_thousand_short_texts_is_cheap():
    base = ["The quick brown fox jumps over the lazy dog {i}.", "Größenänderung über Äpfel Nummer {i}",
            "Contact me at user{i}@example.com or +1-202-555-0143", "<p>Item {i} &amp; more</p>",
            "中文文本 {i} 😀", "if (a<b) return {i}; // see v1.2.{i}", "Le cafÃ© numéro {i}"]
    texts = [base[i % len(base)].format(i=i) for i in range(10_000)]
    started = time.perf_counter()
    issues = sum(len(text_issues(t)) for t in texts)
    pii = sum(len(find_pii(t)) for t in texts)
    elapsed = time.perf_counter() - started
    per_text = elapsed / len(texts) * 1e6
    print(f"\ntext_issues + find_pii over {len(texts)} texts: {elapsed:.2f} s ({per_text:.0f} µs/text)")
    assert issues == 1429 * 3 + 1428  # <p>, &amp;, </p> in each markup row; Ã© in each mojibake row
    assert pii == 1429 * 2  # an email and a phone in each contact row
    assert elapsed < 60  # a sanity bound only; the printed time is what to watch

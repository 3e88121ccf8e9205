"""Text quality gate: find broken text and personal data in a row, repair or redact it, spot boilerplate lines.

Pure Python (ftfy for mojibake, no torch). Every finding carries character offsets into the text that was checked.
Every fixer is idempotent (f(f(x)) == f(x)), and the placeholders `redact_pii` writes are never found again.
Run the fixers in this order: fix_unicode, strip_markup, remove_control_chars, normalize_whitespace.
"""

from __future__ import annotations

import bisect
import html
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html.entities import html5 as _HTML5_ENTITIES

import ftfy

from tunesmith.errors import DataError

__all__ = ["Finding", "PII_KINDS", "QUALITY_KINDS", "boilerplate", "find_pii", "fix_unicode", "mask",
           "normalize_whitespace", "redact_pii", "remove_control_chars", "strip_markup", "text_issues"]

QUALITY_KINDS = ("mojibake", "markup", "control_chars")
PII_KINDS = ("email", "phone", "card", "iban", "ip", "secret")


@dataclass(frozen=True)
class Finding:
    """One problem in a text: its kind (a QUALITY_KINDS or PII_KINDS name), where it is, and the matched text."""

    kind: str
    start: int
    end: int
    text: str


def _finding(kind: str, text: str, start: int, end: int) -> Finding:
    return Finding(kind, start, end, text[start:end])


def _non_overlapping(findings: Iterable[Finding], preference) -> list[Finding]:
    """Keep the most preferred findings (lowest `preference` key) that overlap no kept one; sorted by start."""
    starts: list[int] = []  # kept findings, in text order
    kept: list[Finding] = []
    for f in sorted(findings, key=preference):
        at = bisect.bisect_right(starts, f.start)
        if (at == 0 or kept[at - 1].end <= f.start) and (at == len(kept) or f.end <= kept[at].start):
            starts.insert(at, f.start)
            kept.insert(at, f)
    return kept


# ------------------------------------------------------------------------------------------- mojibake (ftfy)

# UTF-8 read as cp1252/latin-1 leaves a lead byte (Â..ô) followed by a continuation byte (0x80-0xBF as decoded);
# UTF-8 Cyrillic read as cp1251 leaves Р/С followed by one. Only texts with such a pair are given to ftfy.
_CONT_1252 = bytes(range(0x80, 0xC0)).decode("cp1252", errors="ignore") + "".join(map(chr, range(0x80, 0xA0)))
_CONT_1251 = bytes(range(0x80, 0xC0)).decode("cp1251", errors="ignore")
_MOJIBAKE_HINT = re.compile(f"[\xc2-\xf4][{re.escape(_CONT_1252)}]|[РС][{re.escape(_CONT_1251)}]"
                            "|[ÂÃ] |[\x80-\x9f\ufffd\ud800-\udfff]")  # `Ã ` is `à` whose 0xA0 byte became a space
# Repair encodings only: quotes, widths, ligatures, entities, line breaks and controls are left as they are.
_ENCODING_ONLY = dict(unescape_html=False, remove_terminal_escapes=False, fix_latin_ligatures=False,
                      fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
                      remove_control_chars=False, explain=False)
_DETECT_CONFIG = ftfy.TextFixerConfig(normalization=None, **_ENCODING_ONLY)
_REPAIR_CONFIG = ftfy.TextFixerConfig(normalization="NFC", **_ENCODING_ONLY)
_REPLACEMENT_RUN = re.compile("\ufffd+")


def _mojibake(text: str) -> list[Finding]:
    if text.isascii() or not _MOJIBAKE_HINT.search(text):
        return []
    spans = _changed_spans(text, ftfy.fix_text(text, _DETECT_CONFIG))
    found = [_finding("mojibake", text, a, b) for a, b in spans]
    found += [_finding("mojibake", text, m.start(), m.end()) for m in _REPLACEMENT_RUN.finditer(text)]
    return _non_overlapping(found, lambda f: (f.start, -f.end))


def _changed_spans(original: str, fixed: str) -> list[tuple[int, int]]:
    """Spans of `original` that the repair changed, adjacent ones merged.

    Repairs are short local replacements, so after each difference the two texts fall back into step within a
    few characters: a linear walk, where a general diff would be quadratic on long texts.
    """
    spans: list[tuple[int, int]] = []
    i = j = 0
    while i < len(original) or j < len(fixed):
        i, j = _skip_equal(original, i, fixed, j)
        if i == len(original) and j == len(fixed):
            break
        k, l = _resync(original, i, fixed, j)
        a, b = (i, i + k) if k else (max(i - 1, 0), min(i + 1, len(original)))  # an insertion marks its neighbours
        if spans and spans[-1][1] >= a:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
        i, j = i + k, j + l
    return spans


def _skip_equal(original: str, i: int, fixed: str, j: int) -> tuple[int, int]:
    while i < len(original) and j < len(fixed) and original[i] == fixed[j]:
        step = 64 if original[i:i + 64] == fixed[j:j + 64] and i + 64 <= len(original) else 1
        i, j = i + step, j + step
    return i, j


def _resync(original: str, i: int, fixed: str, j: int, window: int = 3) -> tuple[int, int]:
    """The fewest characters (k of `original`, l of `fixed`) to skip before the texts agree again."""
    for distance in range(1, 33):
        for k in range(min(distance, 24), -1, -1):
            l = distance - k
            if l <= 8 and original[i + k:i + k + window] == fixed[j + l:j + l + window]:
                return k, l
    return len(original) - i, len(fixed) - j


def fix_unicode(text: str) -> str:
    """Repair mojibake and broken unicode with ftfy (encodings, surrogates, C1 controls) and NFC-normalize.

    Quotes, full-width forms, ligatures and HTML entities are left as they are; U+FFFD can't be repaired and stays.
    """
    return ftfy.fix_text(text, _REPAIR_CONFIG)


# ---------------------------------------------------------------------------------------------------- markup

_HTML_TAGS = frozenset("""a abbr address area article aside audio b base bdi bdo blockquote body br button canvas
caption center cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption
figure font footer form frame h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend li link
main map mark meta meter nav noscript object ol optgroup option output p param picture pre progress q rp rt ruby s
samp script section select small source span strike strong style sub summary sup svg table tbody td template
textarea tfoot th thead time title tr track tt u ul var video wbr""".split())
_BLOCK_TAGS = frozenset("""address article aside blockquote body br div dl dd dt fieldset figcaption figure footer
form h1 h2 h3 h4 h5 h6 head header hr html li main nav ol p pre section table tbody td tfoot th thead tr ul""".split())
_BOOLEAN_ATTRS = frozenset("""allowfullscreen async autofocus autoplay checked controls default defer disabled hidden
ismap itemscope loop multiple muted nomodule novalidate nowrap open readonly required reversed selected""".split())
_ATTR = r"""\s+[A-Za-z_:@][\w:.@-]*(?:\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'=<>`]+))?"""
_TAG = re.compile(rf"<(?P<close>/)?(?P<name>[A-Za-z][A-Za-z0-9]*(?:[:_.-][A-Za-z0-9]+)*)"
                  rf"(?P<attrs>(?:{_ATTR})*)\s*(?P<selfclose>/)?>")
_ATTR_NAME = re.compile(r"\s+([^\s=]+)(\s*=)?")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|(?P<named>[A-Za-z][A-Za-z0-9]{1,31}));")
_MARKUP_BLOCKS = re.compile(r"<(script|style)\b[^<>]*>[\s\S]*?</\1\s*>|<!--[\s\S]*?-->|<!DOCTYPE\b[^<>]*>"
                            r"|<\?[A-Za-z][^<>]*\?>|<\|[^<>|\s]{1,40}\|>", re.IGNORECASE)


def _markup(text: str) -> list[tuple[Finding, str]]:
    """Markup findings, each with what `strip_markup` puts in its place."""
    if "<" not in text and "&" not in text:
        return []
    found: list[tuple[Finding, str]] = []
    if "<" in text:
        found += [(_finding("markup", text, m.start(), m.end()), "") for m in _MARKUP_BLOCKS.finditer(text)]
        for m in _TAG.finditer(text):
            if _is_tag(m, text):
                name = m["name"].lower()
                found.append((_finding("markup", text, m.start(), m.end()), "\n" if name in _BLOCK_TAGS else ""))
    if "&" in text:
        for m in _ENTITY.finditer(text):
            if not m["named"] or m["named"] + ";" in _HTML5_ENTITIES:
                found.append((_finding("markup", text, m.start(), m.end()), html.unescape(m.group())))
    replacement = {f: r for f, r in found}
    kept = _non_overlapping(replacement, lambda f: (f.start, -f.end))
    return [(f, replacement[f]) for f in kept]


def _is_tag(m: re.Match, text: str) -> bool:
    """Tell an HTML/XML tag from `a<b and c>d`, `List<String>` or `<your name>`."""
    name, attrs = m["name"], m["attrs"]
    if m["close"]:
        return not attrs and not m["selfclose"]
    pairs = _ATTR_NAME.findall(attrs)
    if any(not eq and attr.lower() not in _BOOLEAN_ATTRS for attr, eq in pairs):
        return False
    if m["selfclose"]:
        return True
    after_word = m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_")
    if name.lower() in _HTML_TAGS:
        return not after_word or name.islower()  # `Foo<A>` is a generic type, `word<br>` is a tag
    return any(eq for _, eq in pairs) or f"</{name}>" in text


def strip_markup(text: str) -> str:
    """Remove HTML/XML tags, comments and chat-template tokens, drop <script>/<style> bodies, unescape entities.

    Block-level tags (p, div, br, li, ...) become a newline; run `normalize_whitespace` afterwards to tidy up.
    Comparisons such as `a < b` are kept. Repeats until nothing changes, so `&lt;p&gt;` goes too.
    """
    while True:
        pieces, pos = [], 0
        for finding, replacement in _markup(text):
            pieces += [text[pos:finding.start], replacement]
            pos = finding.end
        stripped = "".join(pieces) + text[pos:]
        if stripped == text:
            return text
        text = stripped


# -------------------------------------------------------------------------------------- control characters

# Zero-width joiners are part of emoji sequences and of Persian/Indic spelling: kept between two such characters.
_NOT_JOINED = "\x00-\x7f\x80-\x9f\\s\u200b-\u200d\u2060\ufeff"
_CONTROL = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]"
                      f"|[\u200c\u200d](?:(?<![^{_NOT_JOINED}].)|(?![^{_NOT_JOINED}]))")


def _control_chars(text: str) -> list[Finding]:
    return [_finding("control_chars", text, m.start(), m.end()) for m in _CONTROL.finditer(text)]


def remove_control_chars(text: str) -> str:
    """Drop C0/C1 control characters (keeping \\n and \\t), zero-width spaces/joiners, word joiners and BOMs.

    Line breaks \\r\\n and \\r become \\n. Joiners inside emoji sequences and scripts that spell with them stay.
    """
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def text_issues(text: str) -> list[Finding]:
    """Mojibake/broken unicode, markup remnants (tags, entities, chat-template tokens) and control characters.

    Sorted by start. A control character inside a mojibake span is part of that finding, not a finding of its own.
    """
    mojibake = _mojibake(text)
    starts = [m.start for m in mojibake]
    findings = mojibake + [f for f, _ in _markup(text)]
    for f in _control_chars(text):
        at = bisect.bisect_right(starts, f.start) - 1
        if at < 0 or mojibake[at].end <= f.start:
            findings.append(f)
    return sorted(findings, key=lambda f: (f.start, f.end, f.kind))


# ---------------------------------------------------------------------------------------------- whitespace

_SPACE_RUN = re.compile("[ \t\f\v\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]{2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs to one space, strip line ends, allow one blank line at most, strip both ends.

    Single newlines stay, and so does each line's leading indentation (code in training data needs it).
    """
    lines = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        body = line.lstrip(" \t")
        body = _SPACE_RUN.sub(" ", body).rstrip()
        lines.append(line[:len(line) - len(line.lstrip(" \t"))] + body if body else "")
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# ------------------------------------------------------------------------------------------------------- PII

_FILE_EXTENSIONS = frozenset("png jpg jpeg gif svg webp ico bmp css js ts py json txt md pdf zip".split())
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"(?P<tld>[A-Za-z]{2,24})(?![\w-]|\.[A-Za-z0-9])")
_PHONE = re.compile(r"""(?<![\w+.,/-])(?:
      \+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6}     # +44 20 7946 0958, +1-202-555-0143
    | (?:1[ .-])?\(\d{3}\)[ ]?\d{3}[ .-]\d{4}                  # (555) 123-4567
    | (?:1[ .-])?\d{3}(?P<sep>[ .-])\d{3}(?P=sep)\d{4}         # 555-123-4567, 1-800-555-0199
    | 0[1-9]\d{0,3}(?:[ -]\d{2,8}){1,3}                        # national with trunk 0: 020 7946 0958
    )(?![\w-]|[.,:/]\d)""", re.VERBOSE)
_CARD = re.compile(r"(?<![\w.,-])(?:\d{13,19}|\d{4}(?P<sep>[ -])\d{3,6}(?:(?P=sep)\d{3,6}){1,3})(?![\w]|[.,-]\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
_IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in """AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BR29 BY28
CH21 CR22 CY28 CZ24 DE22 DK18 DO28 EE20 EG29 ES24 FI18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23
IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 MC27 MD24 ME22 MK19 MR27 MT31 MU30 NL18 NO15 PK24 PL28
PS29 PT25 QA29 RO24 RS22 SA24 SC31 SE24 SI19 SK24 SM27 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20""".split()}
_DIGIT_RUN = re.compile(r"\d+")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?"
                   r"(?![\w:]|\.\d)")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver|release|build|firmware)\.?|\bv)\s*$", re.IGNORECASE)
_SECRET_HINTS = ("akia", "asia", "ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "xox", "sk-", "_live_", "aiza",
                 "eyj", "private key", "pass", "pwd", "secret", "key", "token")
_SECRET_TOKENS = [re.compile(p) for p in (
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"                         # private key block, or its unterminated head
    r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----|(?:\r?\n[A-Za-z0-9+/=]{16,})*)",
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",                               # AWS access key id
    r"\b(?:ghp|gho|ghs|ghu|ghr)_[A-Za-z0-9]{20,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",  # GitHub
    r"\bxox[bpars]-[A-Za-z0-9-]{10,}",                              # Slack
    r"\b(?:sk|rk)_live_[A-Za-z0-9]{16,}\b",                         # Stripe
    r"\bsk-(?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{20,}",                    # OpenAI-style (needs a digit)
    r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",                    # Google API key
    r"\beyJ[A-Za-z0-9_-]{7,}\.[A-Za-z0-9_-]{7,}\.[A-Za-z0-9_-]{7,}",  # JWT
)]
_SECRET_ASSIGNMENT = re.compile(
    r"""(?<![\w-])[\w.-]*?(?:password|passwd|pwd|passphrase|secret|api[_-]?key|apikey|access[_-]?key|token)"""
    r"""(?:[_-]?(?:key|id|secret|token|value))?["']?\s*[:=]\s*(?P<quote>["']?)"""
    r"""(?P<value>[^\s"'`,;()<>{}\[\]]{8,})(?P=quote)(?![^\s"'`,;])""", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[$%]?[A-Za-z_][A-Za-z_.]*")
_PII_RANK = {kind: rank for rank, kind in enumerate(("secret", "card", "iban", "email", "ip", "phone"))}


def _emails(text: str) -> list[Finding]:
    if "@" not in text:
        return []
    return [_finding("email", text, m.start(), m.end()) for m in _EMAIL.finditer(text)
            if m["tld"].lower() not in _FILE_EXTENSIONS]


def _phones(text: str) -> list[Finding]:
    return [_finding("phone", text, m.start(), m.end()) for m in _PHONE.finditer(text)
            if 9 <= sum(c.isdigit() for c in m.group()) <= 15]


def _cards(text: str) -> list[Finding]:
    found = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and len(set(digits)) > 1 and _luhn_ok(digits):
            found.append(_finding("card", text, m.start(), m.end()))
    return found


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _ibans(text: str) -> list[Finding]:
    found = []
    for m in _IBAN.finditer(text):
        candidate = m.group()
        expected = _IBAN_LENGTHS.get(candidate[:2])
        while expected and len(candidate.replace(" ", "")) > expected and " " in candidate:
            candidate = candidate.rsplit(" ", 1)[0]  # the match ran on into the next word
        compact = candidate.replace(" ", "")
        if expected and len(compact) == expected and _iban_checksum_ok(compact):
            found.append(_finding("iban", text, m.start(), m.start() + len(candidate)))
    return found


def _iban_checksum_ok(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ips(text: str) -> list[Finding]:
    found = []
    if _IPV4_HINT.search(text):
        for m in _IPV4.finditer(text):
            if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
                continue
            found += _valid_ip(text, m, ipaddress.IPv4Address)
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            groups = [g for g in m.group().split(":") if g]
            if len(groups) >= 3 or any(len(g) >= 3 for g in groups):  # not `ab::cd`
                found += _valid_ip(text, m, ipaddress.IPv6Address)
    return found


def _valid_ip(text: str, m: re.Match, address_type) -> list[Finding]:
    """The match as an `ip` finding, unless invalid, unspecified, loopback or a netmask (255.x.x.x)."""
    try:
        address = address_type(m.group())
    except ValueError:
        return []
    if address.is_unspecified or address.is_loopback or m.group().startswith("255."):
        return []
    return [_finding("ip", text, m.start(), m.end())]


def _secrets(text: str) -> list[Finding]:
    lowered = text.lower()
    if not any(hint in lowered for hint in _SECRET_HINTS):
        return []
    found = [_finding("secret", text, m.start(), m.end()) for p in _SECRET_TOKENS for m in p.finditer(text)]
    for m in _SECRET_ASSIGNMENT.finditer(text):
        value = m["value"]
        looks_like_code = not m["quote"] and _IDENTIFIER.fullmatch(value)  # `password = user.password`
        if not looks_like_code and len(set(value)) > 1:
            found.append(_finding("secret", text, m.start("value"), m.end("value")))
    return found


def find_pii(text: str) -> list[Finding]:
    """Emails, phone numbers, payment cards (Luhn), IBANs (mod 97), IP addresses and secrets, sorted by start.

    Findings never overlap: a secret beats everything, then the longer match, then the more specific kind.
    """
    found = _emails(text) + _secrets(text) + _ips(text)
    digits = sum(len(run) for run in _DIGIT_RUN.findall(text))
    if digits >= 9:
        found += _phones(text) + (_cards(text) if digits >= 13 else [])
    if digits >= 2 and _IBAN_HINT.search(text):
        found += _ibans(text)
    return _non_overlapping(found, lambda f: (f.kind != "secret", f.start - f.end, _PII_RANK[f.kind], f.start))


def redact_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, Counter]:
    """Replace each finding of `kinds` with a placeholder ([EMAIL], [PHONE], ...); also count them by kind.

    Repeats until nothing is found: a placeholder can free a neighbour that was glued to the replaced text.
    """
    wanted = set(kinds)
    unknown = sorted(wanted - set(PII_KINDS))
    if unknown:
        raise DataError(f"unknown PII kind(s) {', '.join(unknown)}", f"choose from {', '.join(PII_KINDS)}")
    counts: Counter = Counter()
    while findings := [f for f in find_pii(text) if f.kind in wanted]:
        pieces, pos = [], 0
        for f in findings:
            pieces += [text[pos:f.start], f"[{f.kind.upper()}]"]
            pos = f.end
        text = "".join(pieces) + text[pos:]
        counts.update(f.kind for f in findings)
    return text, counts


def mask(finding: Finding) -> str:
    """A version of the finding that is safe to show in a report (PII mostly starred out)."""
    text, kind = finding.text, finding.kind
    if kind == "email":
        local, _, domain = text.partition("@")
        host, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***.{tld}"
    if kind == "phone":
        keep = [i for i, c in enumerate(text) if c.isdigit()][-2:]
        return "".join("*" if c.isdigit() and i not in keep else c for i, c in enumerate(text))
    if kind == "card":
        return "**** **** **** " + re.sub(r"\D", "", text)[-4:]
    if kind == "iban":
        compact = text.replace(" ", "")
        return compact[:2] + "*" * (len(compact) - 6) + compact[-4:]
    if kind == "ip":
        return text.split(".")[0] + ".*.*.*" if "." in text and ":" not in text else text.split(":")[0] + ":*:*:*"
    if kind == "secret":
        return f"{text[:4]}… ({len(text)} chars)"
    shown = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return shown if len(shown) <= 60 else shown[:59] + "…"


# ----------------------------------------------------------------------------------------------- boilerplate

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def boilerplate(texts: Sequence[str], min_rows: int = 3, min_share: float = 0.01,
                min_chars: int = 20) -> list[tuple[str, int]]:
    """Lines (or sentences, for single-line rows) repeated across rows, such as disclaimers and signatures.

    A line counts once per row; it must be at least `min_chars` long, occur in at least
    max(`min_rows`, `min_share` × rows) different rows, and not be the whole row (those are duplicates).
    Returns (line, rows) sorted by rows, most first, then by line.
    """
    rows_with: Counter = Counter()
    for text in texts:
        whole = text.strip()
        parts = whole.split("\n") if "\n" in whole else _SENTENCE_END.split(whole)
        rows_with.update({p.strip() for p in parts if len(p.strip()) >= min_chars and p.strip() != whole})
    threshold = max(min_rows, min_share * len(texts))
    return sorted(((line, n) for line, n in rows_with.items() if n >= threshold), key=lambda item: (-item[1], item[0]))

"""PII scrubbing for prompts that leave the machine: typed placeholders, counted per type.

Why: a remote teacher (an OpenAI-compatible server run by someone else) sees every prompt we
send, and seeds taken from real mail, tickets and 稟議 memos carry addresses, phone numbers,
card numbers and My Numbers. Each is replaced by a placeholder the teacher can still reason
about ("call [PHONE]") and counted, so a run can report what it held back.

Matching reads the NFKC form of the text, so full-width ０３－１２３４－５６７８ reads as
03-1234-5678, but the placeholder replaces the span of the ORIGINAL text: everything around it,
full-width or not, reaches the teacher unchanged.

Numbers that carry a check digit (cards: Luhn; My Number: the ordinance's mod 11) are replaced
only when the check holds, so order numbers and IDs of the same length survive. No pattern
may cut a piece out of a longer token: dates (2026-11-28), order numbers (ORD-20261128-0042)
and versions (v1.2.3) stay whole.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PiiSpan:
    kind: str  # one of PII_TYPES
    start: int  # text[start:end] is the item, in the original (not NFKC-folded) text
    end: int


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: dict[str, int]  # only the types found, e.g. {"email": 1, "phone": 2}


# Dashes typed between digit groups, as they look after NFKC (which already folds the
# full-width － and half-width ｰ): ASCII hyphen, U+2010..U+2015 hyphens and dashes, U+2212
# minus, and ー (U+30FC), which Japanese IMEs often produce for "-" in phone numbers.
_DASH = "[\\-\u2010-\u2015\u2212\u30fc]"
# Characters that join digit groups into one longer token (dates, versions, order numbers).
_JOIN = "[.\\-\u2010-\u2015\u2212\u30fc]"
# Not a piece of a longer token: no ASCII letter or digit directly beside the match, no
# "digit + joiner" (2026-11-28, v1.2.3) and no "letter + dash" in front (ORD-0312345678);
# "Tel.03-1234-5678" still matches. Patterns are compiled with re.ASCII, so \w is
# [A-Za-z0-9_] and Japanese text may touch a match ("電話090-1234-5678まで").
_BEFORE = rf"(?<!\w)(?<!\d{_JOIN})(?<!\w{_DASH})"
_AFTER = rf"(?!\w)(?!{_JOIN}\d)"
# A space-grouped number must not be the tail or head of a longer space-grouped one.
_SPACE_BEFORE = r"(?<!\d )"
_SPACE_AFTER = r"(?! \d)"


def _digits(matched: str) -> str:
    return re.sub(r"[^0-9]", "", matched)


def _grouped(sizes: tuple[int, ...]) -> list[str]:
    """Digit groups of the given sizes, joined by dashes or by single spaces (not mixed)."""
    groups = [rf"\d{{{n}}}" for n in sizes]
    return [_DASH.join(groups), _SPACE_BEFORE + " ".join(groups) + _SPACE_AFTER]


def _number(unbroken: str, layouts: tuple[tuple[int, ...], ...]) -> re.Pattern[str]:
    """A whole number: a run of digits, or one of the printed group layouts."""
    alternatives = [unbroken] + [alt for sizes in layouts for alt in _grouped(sizes)]
    return re.compile(_BEFORE + "(?:" + "|".join(alternatives) + ")" + _AFTER, re.ASCII)


def _luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check of card numbers (ISO/IEC 7812-1, Annex B)."""
    total = 0
    for position, ch in enumerate(reversed(digits)):
        d = int(ch)
        if position % 2 == 1:  # every second digit from the right is doubled
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _my_number_check_digit(first11: str) -> int:
    """検査用数字 of a My Number (個人番号) from its first 11 digits.

    平成26年総務省令第85号 第5条: check = 11 - (sum_{n=1..11} P_n * Q_n mod 11), or 0 when that
    remainder is <= 1; P_n is the n-th digit counted from the right of the 11, and
    Q_n = n + 1 for 1 <= n <= 6, n - 5 for 7 <= n <= 11 (weights 2..7, then 2..6).
    Worked example: 12345678901 -> sum 212, 212 mod 11 = 3, check 8 (123456789018).
    """
    total = sum(int(p) * (n + 1 if n <= 6 else n - 5)
                for n, p in enumerate(reversed(first11), start=1))
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def _is_card(matched: str) -> bool:
    digits = _digits(matched)
    return 13 <= len(digits) <= 19 and _luhn_valid(digits)  # PAN length range, ISO/IEC 7812-1


def _is_my_number(matched: str) -> bool:
    digits = _digits(matched)
    return len(digits) == 12 and int(digits[11]) == _my_number_check_digit(digits[:11])


def _is_jp_phone(matched: str) -> bool:
    # Japanese numbering plan (総務省 電気通信番号計画): fixed lines and 0120 are 0 + 9 digits,
    # mobile (070/080/090), 050 IP phones and 0800 are 0 + 10 digits.
    return len(_digits(matched)) in (10, 11)


def _is_intl_phone(matched: str) -> bool:
    # E.164 (ITU-T) caps a number at 15 digits with its country code. The floor of 8 is our
    # judgement: a shorter "+…" run is more likely a delta ("+20 30") than a diallable number.
    return 8 <= len(_digits(matched)) <= 15


def _always(matched: str) -> bool:
    return True


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool]  # the matched (NFKC) text -> is it really this kind


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0-255, no leading zeros

# Applied in this order. E-mail first: its local part may hold digits that look like a phone.
# Cards and My Numbers before phones: a 12-19 digit number is never cut into a phone number.
_RULES: tuple[_Rule, ...] = (
    _Rule("email", re.compile(
        r"(?<![\w.%+\-])[A-Za-z0-9._%+\-]+@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w\-])",
        re.ASCII), _always),
    # Printed layouts: 4-4-4-4 (most), 4-4-4-4-3 (19-digit), 4-6-5 (Amex), 4-6-4 (Diners).
    _Rule("credit_card", _number(r"\d{13,19}", ((4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4))),
          _is_card),
    _Rule("my_number", _number(r"\d{12}", ((4, 4, 4),)), _is_my_number),
    # International: +CC then up to five groups (spaces or dashes, a bracketed area code, the
    # "(0)" trunk prefix some Japanese cards print): +1 415 555 0132, +81 (0)3-1234-5678.
    # Brackets only in pairs, so "(+1 415 555 0132)" keeps its closing bracket.
    _Rule("phone", re.compile(
        rf"(?<![\w+])\+\d{{1,3}}(?: ?\(0\))?(?:(?: |{_DASH})?(?:\(\d{{1,4}}\)|\d{{1,4}})){{2,5}}{_AFTER}",
        re.ASCII), _is_intl_phone),
    # Japanese, always starting with the trunk 0: 0312345678, 03-1234-5678, 0120-123-456,
    # 03 1234 5678, (03)1234-5678.
    _Rule("phone", re.compile(
        _BEFORE + "(?:"
        r"0\d{9,10}"
        rf"|0\d{{1,4}}{_DASH}\d{{1,4}}{_DASH}\d{{3,4}}"
        rf"|{_SPACE_BEFORE}0\d{{1,4}} \d{{1,4}} \d{{3,4}}{_SPACE_AFTER}"
        rf"|\(0\d{{1,4}}\) ?\d{{1,4}}{_DASH}\d{{3,4}}"
        ")" + _AFTER, re.ASCII), _is_jp_phone),
    # 〒 makes any 3+4 digits a postal code; without it only the hyphenated 123-4567 counts,
    # so plain 7-digit order numbers survive, and a leading dash (SKU-441-2889) rules it out.
    _Rule("postal_code", re.compile(
        rf"〒 ?\d{{3}}{_DASH}?\d{{4}}{_AFTER}"
        rf"|(?<!{_DASH}){_BEFORE}\d{{3}}{_DASH}\d{{4}}{_AFTER}", re.ASCII), _always),
    # Four octets 0-255, not part of a dotted run (1.2.3.4.5) or a version (v1.2.3.4).
    _Rule("ipv4", re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w)(?!\.\d)", re.ASCII),
          _always),
)

PII_TYPES: tuple[str, ...] = tuple(dict.fromkeys(rule.kind for rule in _RULES))
_PLACEHOLDER = {kind: f"[{kind.upper()}]" for kind in PII_TYPES}


def _nfkc_with_origin(text: str) -> tuple[str, list[int]]:
    """NFKC text plus, for each of its characters, the index of the original character.

    Normalised one character at a time so every match maps back onto whole original
    characters. It differs from whole-string NFKC only where characters compose (ｶﾞ), never in
    the digits, ASCII letters and punctuation the patterns read.
    """
    if text.isascii():  # NFKC leaves ASCII alone
        return text, list(range(len(text)))
    pieces: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        folded = unicodedata.normalize("NFKC", ch)
        pieces.append(folded)
        origin.extend([i] * len(folded))
    return "".join(pieces), origin


def _spans(rule: _Rule, text: str) -> list[tuple[int, int]]:
    """(start, end) in `text` of every accepted match of one rule, left to right, not overlapping."""
    normalised, origin = _nfkc_with_origin(text)
    spans: list[tuple[int, int]] = []
    for match in rule.pattern.finditer(normalised):
        if not rule.accept(match.group()):
            continue
        start, end = origin[match.start()], origin[match.end() - 1] + 1
        if spans and start < spans[-1][1]:  # two matches inside one expanded character (e.g. ⑴): keep one
            continue
        spans.append((start, end))
    return spans


def _apply(rule: _Rule, text: str) -> tuple[str, int]:
    """Replace every accepted match of one rule; return the new text and how many."""
    pieces: list[str] = []
    copied_to = 0  # text[:copied_to] has been emitted
    spans = _spans(rule, text)
    for start, end in spans:
        pieces += [text[copied_to:start], _PLACEHOLDER[rule.kind]]
        copied_to = end
    pieces.append(text[copied_to:])
    return "".join(pieces), len(spans)


def scrub(text: str) -> ScrubResult:
    """Replace e-mails, phones, cards, My Numbers, postal codes and IPv4s by typed placeholders.

    Rescans until nothing changes: replacing one item can remove the digit neighbour that kept
    an adjacent item from matching ("03-1234-5678 1234 5678 9018"), and a fixpoint is what
    makes scrub idempotent. It terminates: every replacement removes at least one digit or '@'.
    """
    counts: dict[str, int] = {}
    while True:
        changed = False
        for rule in _RULES:
            text, found = _apply(rule, text)
            if found:
                counts[rule.kind] = counts.get(rule.kind, 0) + found
                changed = True
        if not changed:
            return ScrubResult(text, {kind: counts[kind] for kind in PII_TYPES if kind in counts})


def scrub_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Scrub the 'content' of every message; return new messages and summed counts.

    The input list and its dicts are left untouched, so the caller keeps the original prompt
    (and its hash, the prompt id) for the local store.
    """
    scrubbed: list[dict[str, str]] = []
    totals: dict[str, int] = {}
    for message in messages:
        if "content" not in message:
            scrubbed.append(dict(message))
            continue
        result = scrub(message["content"])
        scrubbed.append({**message, "content": result.text})
        for kind, n in result.counts.items():
            totals[kind] = totals.get(kind, 0) + n
    return scrubbed, {kind: totals[kind] for kind in PII_TYPES if kind in totals}


def find_pii(text: str) -> list[PiiSpan]:
    """The items `scrub` replaces, as spans of the original text, in text order.

    Same rules, same order, same fixpoint as `scrub`, but a found item is masked instead of
    replaced: "[" then "]"s over its own length, so every later span is still an offset into the
    original text. The mask looks to every pattern as the placeholder does: the patterns look at
    most two characters past a match's edge, and both start with "[" and end in "]", which no
    pattern's character classes hold (tests/test_privacy.py checks this against scrub on every
    document it tests).
    """
    found: list[PiiSpan] = []
    masked = text
    changed = True
    while changed:
        changed = False
        for rule in _RULES:
            for start, end in _spans(rule, masked):
                found.append(PiiSpan(rule.kind, start, end))
                masked = masked[:start] + "[" + "]" * (end - start - 1) + masked[end:]
                changed = True
    return sorted(found, key=lambda span: span.start)

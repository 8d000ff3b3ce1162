"""Language-aware text units and ROUGE-L, so Japanese is scored and deduplicated correctly.

Why our own: `rouge-score` (the reference package) tokenises with an ASCII-only regex and
drops every Japanese character, so two unrelated Japanese answers score 0 and identical ones
score 0 too. Here CJK text is split by character and other text into lower-cased words, the
usual practice for Japanese ROUGE/chrF. LCS is the textbook dynamic programme.
"""

from __future__ import annotations

import re
import unicodedata

# Hiragana, katakana (incl. half-width), CJK unified ideographs (+ext A), CJK punctuation,
# full-width forms. Each such character is one unit; runs of letters/digits are words.
_CJK = r"\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}\W]+|[^\s\w{_CJK}]", re.UNICODE)
_JA_KANA = re.compile(r"[\u3040-\u30ff]")
_CJK_CHAR = re.compile(rf"[{_CJK}]")


def text_units(text: str, *, keep_punct: bool = False) -> list[str]:
    """Units for ROUGE: one per CJK character, one per lower-cased word elsewhere."""
    units = _UNIT.findall(text.lower())
    if keep_punct:
        return units
    return [u for u in units if not _is_punct(u)]


def _is_punct(unit: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PSZ" for ch in unit)


def detect_lang(text: str) -> str:
    """A coarse tag for filters and reports: 'ja' (any real share of kana), 'zh', 'en' or 'other'."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "other"
    kana = len(_JA_KANA.findall(text))
    cjk = len(_CJK_CHAR.findall(text))
    if kana / len(letters) >= 0.05:
        return "ja"
    if cjk / len(letters) >= 0.3:
        return "zh"
    ascii_letters = sum(c.isascii() for c in letters)
    return "en" if ascii_letters / len(letters) >= 0.8 else "other"


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on language-aware units (Lin 2004, beta = 1)."""
    cand, ref = text_units(candidate), text_units(reference)
    if not cand or not ref:
        return float(cand == ref)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)

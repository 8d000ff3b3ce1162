"""Reading a numeric final answer from a model's text, the way English and Japanese write it.

Used by exact match (`evaluate.tasks`) and by the generate stage's answer verifier
(`data.verify`, issue 16): `extract_number` reads the answer of a free-text reply,
`parse_number` reads a gold that is only a number; `final_text`, `normalise_text` and
`chosen_by_text` read text and multiple-choice answers the same way for both.

What "the last number" (GSM8K's rule, read after NFKC) got wrong on Japanese math answers
in realistic styles (issue 19): `7万ドル` → 7, `5万7500ドル` → 7500 (万 is a multiplier, not
a separator); `十八` → nothing (kanji numerals); `18㎡` and `18 m²` → 2 (NFKC turns the unit
into `m2` before the digits are read); `−5` (U+2212) → 5; and `答えは18ドルです（1個あたり
2ドル）` → 2 (a number after the answer). So:

- characters that are not digits but whose NFKC holds digits (㎡, ², ①) lose those digits
  before NFKC, and a number glued after an ASCII letter (`m2`, `CO2`, `A4`) is part of a word;
- a numeral is a run of Arabic numbers (commas, decimals), kanji digits 〇一…九 and the
  multipliers 十百千 / 万億兆, read as Japanese reads it (`1億2345万6789`, `二千五百`,
  digit by digit without multipliers: `二〇二四`). A lone kanji digit is a number only before
  a counter (`三つ`, `五人`), so 一緒, 一般, 九州 and 十分 stay words;
- U+2212, U+2012/2013, U+FE63, U+FF0D, `マイナス` and the accounting triangles △/▲ are minus
  signs right before a number; a dash between two numbers (`5-7`) is not;
- an explicit answer marker (`####`, `\\boxed{`, `Answer:`, `the answer is`, `答え：`, `答えは`,
  `解答：`, `正解は`, …) wins: the last marker followed by a number gives the first number after it
  that is not an operand (a number followed by + − × ÷ = is skipped: `答え：3+5=8` → 8).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata

_KANJI_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_SMALL_UNITS = {"十": 10, "百": 100, "千": 1_000}
_BIG_UNITS = {"万": 10**4, "億": 10**8, "兆": 10**12}
_KANJI = "".join(_KANJI_DIGITS) + "".join(_SMALL_UNITS) + "".join(_BIG_UNITS)
_ARABIC = r"[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?"  # after NFKC every decimal digit we read is ASCII
_UNITS = "".join(_SMALL_UNITS) + "".join(_BIG_UNITS)
# Arabic digits joined only through multipliers (1万2000, 3千5百): 第1四半期 is 1, not 14.
_NUMERAL = re.compile(rf"(?=[0-9{_KANJI}])(?:{_ARABIC}(?:[{_UNITS}]+(?:{_ARABIC})?)*|[{_KANJI}]+)")
_TOKEN = re.compile(rf"{_ARABIC}|[{_KANJI}]")
# A lone kanji digit is a number only before one of these (counters and currency); 分 is left
# out because 十分 (enough) outnumbers 十分 (ten minutes) in prose.
_COUNTERS = tuple("つ個人本枚匹頭羽冊台回倍割点円歳才名件箱袋杯缶粒軒社機隻週日月年時秒階段章問") + (
    "ドル", "ユーロ", "メートル", "キロ", "グラム", "リットル", "パーセント", "か月", "ヶ月", "カ月")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
_NEGATIVE_BEFORE = re.compile(r"(?:(?<![\w.])-|マイナス\s*|[△▲])$")
_OPERATOR_AFTER = re.compile(r"\s*[+\-*/×÷=＝]")
_MARKER = re.compile(  # the lookahead only lets the scan skip faster
    r"(?=[#\\af答解正回最])(?:####|\\boxed\{|\b(?:final\s+)?answer\s*(?:is\b|:|=)|(?:最終的な)?(?:答え|答|解答|正解|回答)\s*(?:は|:|=))",
    re.IGNORECASE)


@functools.cache
def _fold_char(ch: str) -> str:
    """A character whose NFKC holds digits it does not have itself (㎡ → m2, ² → 2, ① → 1)
    without those digits; any other character as it is."""
    nfkc = unicodedata.normalize("NFKC", ch)
    if unicodedata.category(ch) == "Nd" or not any(c.isdigit() for c in nfkc):
        return ch
    return "".join(c for c in nfkc if not c.isdigit()) or " "


def _fold(text: str) -> str:
    """NFKC, minus signs as '-', without the digits NFKC pulls out of units (㎡ → m, ² → '')."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", "".join(map(_fold_char, text)))
    return text.translate(_MINUS_SIGNS)


def _value(run: str) -> float | None:
    """The value of one numeral run (Arabic and kanji mixed: 1万2000, 二千五百, 二〇二四)."""
    total, section, digits = 0.0, 0.0, None  # digits: the coefficient being read
    last_big = math.inf
    for token in _TOKEN.findall(run):
        if token in _KANJI_DIGITS:
            digits = (digits or 0) * 10 + _KANJI_DIGITS[token]
        elif token in _SMALL_UNITS:
            section += (1 if digits is None else digits) * _SMALL_UNITS[token]
            digits = None
        elif token in _BIG_UNITS:
            unit = _BIG_UNITS[token]
            if unit >= last_big or (section == 0 and digits is None):
                return None  # 万億, or a multiplier with nothing before it
            total += (section + (digits or 0)) * unit
            section, digits, last_big = 0.0, None, unit
        else:
            if digits is not None:
                return None  # two numbers side by side
            digits = float(token.replace(",", ""))
    return total + section + (digits or 0)


def _numbers(text: str, pos: int = 0) -> list[tuple[int, int, float]]:
    """(start, end, value) of every number in folded text from pos on, signs applied."""
    found = []
    for match in _NUMERAL.finditer(text, pos):
        run, start = match.group(), match.start()
        while run and run[0] in _BIG_UNITS:  # 万一 (just in case) starts with a multiplier
            run, start = run[1:], start + 1
        if not run:
            continue
        if run[0].isdigit() and start and text[start - 1].isascii() and text[start - 1].isalpha():
            continue  # m2, CO2, A4: part of a word
        if len(run) == 1 and run in _KANJI and not text.startswith(_COUNTERS, match.end()):
            continue  # 一緒, 九州, 十分
        value = _value(run)
        if value is None:
            continue
        if _NEGATIVE_BEFORE.search(text, max(0, start - 8), start):  # マイナス + spaces fit in 8
            value = -value
        found.append((start, match.end(), value))
    return found


def extract_number(text: str) -> float | None:
    """The final numeric answer in a reply: after the last answer marker that a number follows
    (the first such number that is not an operand), else the last number; None if none."""
    folded = _fold(text)
    for marker in reversed(list(_MARKER.finditer(folded))):
        if after := _numbers(folded, marker.end()):
            return next((value for _, end, value in after if not _OPERATOR_AFTER.match(folded, end)), after[-1][2])
    numbers = _numbers(folded)
    return numbers[-1][2] if numbers else None


def parse_number(text: str) -> float | None:
    """A text that is one number and nothing else (a gold answer: '1,234', '−3.5', '1万2000',
    '十八', '18.'), else None."""
    folded = _fold(text).strip().rstrip(".")
    numbers = _numbers(folded)
    if len(numbers) != 1:
        return None
    start, end, value = numbers[0]
    sign = folded[:start].strip()
    return value if end == len(folded) and sign in ("", "-", "マイナス", "△", "▲") else None


def is_number(text: str) -> bool:
    """The whole text is one number (a numeric reference such as GSM8K's gold)."""
    return parse_number(text) is not None


def normalise_text(text: str) -> str:
    """NFKC, case-folded, punctuation and whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\s。、．，.,!！?？「」\"'()（）:：*]+", " ", text).strip()


def final_text(text: str) -> str:
    """What follows the last answer marker (to the end of its line), else the whole text."""
    markers = list(_MARKER.finditer(text))
    if not markers:
        return text
    last = markers[-1]
    rest = text[last.end():]
    if last.group().endswith("{"):  # \boxed{...}: up to its closing brace
        rest = rest.split("}", 1)[0]
    rest = rest.strip()
    return rest.splitlines()[0] if rest else ""


def chosen_by_text(prediction: str, choices: list[str]) -> int | None:
    """The choice a generated answer names: a choice's text (the longest one found wins), else a
    leading choice number; None when it names none."""
    text = unicodedata.normalize("NFKC", prediction)
    named = [(len(c), i) for i, c in enumerate(choices) if unicodedata.normalize("NFKC", c) in text]
    if named:
        return max(named)[1]
    lead = re.match(r"\s*(\d+)", text)
    if lead and int(lead.group(1)) < len(choices):
        return int(lead.group(1))
    return None

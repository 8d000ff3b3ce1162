"""Reading the final answer out of a model's text: the number, the chosen option, the text.

`read_final_number` is the one numeric reader of the generate stage's verifier; keep it small
and here (a richer Japanese number reader is being written for the evaluator, and the two are
to be merged into one).
"""

from __future__ import annotations

import re
import unicodedata

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
# Where a model states its answer; the last one in the text wins over any number before it:
# GSM8K's `#### N`, `\boxed{N}` (MATH, DeepSeek-R1 and Qwen3 on maths), "Answer:" and
# "The answer is", Japanese 答え / 解答 / 正解.
ANSWER_MARKER = re.compile(r"####|\\boxed\{|\banswer\s*(?:is|:)|答え|解答|正解", re.IGNORECASE)


def read_final_number(text: str) -> float | None:
    """The number a text gives as its answer: the first number after the last answer marker,
    else the last number. Full-width digits and separators are read (NFKC), thousands commas
    dropped. None when there is no number."""
    text = unicodedata.normalize("NFKC", text)
    markers = list(ANSWER_MARKER.finditer(text))
    if markers and (after := NUMBER.search(text, markers[-1].end())):
        return float(after.group().replace(",", ""))
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def is_number(text: str) -> bool:
    """The whole text is one number (a numeric reference such as GSM8K's gold)."""
    return NUMBER.fullmatch(unicodedata.normalize("NFKC", text).strip().rstrip(".")) is not None


def normalise_text(text: str) -> str:
    """NFKC, case-folded, punctuation and whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\s。、．，.,!！?？「」\"'()（）:：*]+", " ", text).strip()


def final_text(text: str) -> str:
    """What follows the last answer marker (to the end of its line), else the whole text."""
    markers = list(ANSWER_MARKER.finditer(text))
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

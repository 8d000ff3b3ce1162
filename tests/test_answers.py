"""Reading a numeric final answer the way people write it: Japanese multipliers and kanji
numerals, typographic minus signs, units stuck to the number, and explicit answer markers
that win over the last number. Expected values are written by hand from the text."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from edgedistill.data.answers import extract_number, parse_number


@pytest.mark.parametrize(("text", "expected"), [
    # 万/億 after Arabic digits: the multiplier is part of the number
    ("7万ドル", 70_000), ("5万7500ドル", 57_500), ("1万2000円", 12_000), ("2.5万人", 25_000),
    ("1億2345万6789円", 123_456_789), ("3千円", 3_000), ("1,200万円", 12_000_000),
    # kanji numerals, with and without multipliers
    ("十八", 18), ("答えは十八個です。", 18), ("二千五百円", 2_500), ("三百六十五日", 365),
    ("二〇二四年", 2024), ("一万二千", 12_000), ("三つ", 3),
    # units stuck to the number are not part of it (NFKC turns ㎡ into m2)
    ("18㎡", 18), ("18 m²", 18), ("広さは18m2です", 18), ("3.5kg", 3.5), ("5㎏", 5), ("50％", 50),
    # minus signs: ASCII, U+2212, full-width, マイナス and the accounting triangle
    ("-5", -5), ("−5", -5), ("－５", -5), ("気温はマイナス5度", -5), ("営業利益は△300万円", -3_000_000),
    ("2−5", 5),  # a dash between numbers is a range or an operation, not a sign
    # what already worked: full-width digits and commas, dollars, thousands separators
    ("１，２００円", 1_200), ("$1,200", 1_200), ("答えは７２個です。", 72), ("**答え：18**", 18),
])
def test_extract_number_reads_japanese_and_typographic_forms(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("答えは18ドルです（1個あたり2ドル）", 18),
    ("#### 18\n（2ステップで計算）", 18),
    ("Answer: 18 (we needed 2 steps).", 18),
    ("The answer is 18, since each costs 2.", 18),
    (r"So the total is $\boxed{18}$ after 2 days.", 18),
    ("答え：3+5=8なので8個", 8),  # operands before '=' are skipped
    ("Answer: 4. Wait, that is wrong. Final answer: 6 (not 4)", 6),  # the last marker wins
    ("答えは次のとおりです。\n合計：25個（内訳は3箱）", 25),  # marker, then the first number after it
    ("Answer: 18 apples in 2 baskets. I hope this answer: helps.", 18),  # a marker with no number is skipped
])
def test_an_explicit_answer_marker_wins_over_the_last_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text", [
    "一緒に確認しましょう。", "一般的な答え", "九州と四国", "十分に注意してください", "CO2とH2O", "数値はありません"])
def test_words_that_only_contain_numeral_characters_are_not_numbers(text):
    assert extract_number(text) is None


def test_last_number_when_there_is_no_marker():
    assert extract_number("3個ずつ6人に配ると18個。") == 18
    assert extract_number("合計18個になります。一緒に確かめましょう。") == 18  # 一緒 is not a number
    assert extract_number("5-7 days") == 7  # a range: the '-' is not a sign
    assert extract_number("") is None and extract_number("no digits here") is None


def test_parse_number_reads_a_whole_gold_or_nothing():
    assert parse_number("1,234") == 1234 and parse_number(" −3.5 ") == -3.5 and parse_number("１万２０００") == 12_000
    assert parse_number("十八") == 18 and parse_number("18.") == 18
    assert parse_number("Paris") is None and parse_number("18 apples") is None and parse_number("") is None
    # the negative signs of Japanese accounts, and nothing but a final full stop stripped
    assert parse_number("マイナス5") == -5 and parse_number("△5") == -5 and parse_number("▲5") == -5
    assert parse_number("12X") is None and parse_number("12..") == 12


def test_every_gsm8k_solution_reads_as_its_gold():
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    wrong = [r["answer"][-60:] for r in rows
             if extract_number(r["answer"]) != float(r["answer"].rsplit("####", 1)[1].strip().replace(",", ""))]
    assert len(rows) == 7473 and wrong == []


@pytest.mark.parametrize(("text", "expected"), [
    ("3千5百円", 3_500), ("1千万円", 10_000_000), ("十万円", 100_000), ("三千万人", 30_000_000),
    ("一億二千万", 120_000_000),
    # big multipliers must fall from left to right and follow something: these are no numbers
    ("1万2億", None), ("1万2万", None), ("1億万", None),
])
def test_multipliers_combine_the_japanese_way(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("予算は万単位で、3万円", 30_000),  # a multiplier alone is skipped, the scan goes on
    ("CO2の排出量は5トン", 5),  # a number glued to a word is skipped, the scan goes on
    ("一緒に数えると18個", 18),  # a lone numeral that is a word (一緒) is skipped, the scan goes on
    ("1万2億の3倍", 3),  # so is one that is no number
    # the sign is looked for in the 8 characters before the number: マイナス and up to 4 spaces
    ("気温はマイナス    5度", -5), ("気温はマイナス     5度", 5),
])
def test_skipped_pieces_do_not_end_the_scan(text, expected):
    assert extract_number(text) == expected


def test_a_leading_multiplier_is_not_part_of_the_number():
    from edgedistill.data.answers import _fold, _numbers

    # 万 starts the run of kanji but multiplies nothing: the number is 二千 at 1..3
    assert _numbers(_fold("万二千円")) == [(1, 3, 2000.0)]

import json
from pathlib import Path

import pytest

from edgedistill.data.prompts import load_prompts, read_seed_texts
from edgedistill.data.similarity import dedup_units, detect_lang, rouge_l, text_units
from edgedistill.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_japanese_is_split_by_character_and_scored():
    assert text_units("東京は晴れ。Hello, World!") == ["東", "京", "は", "晴", "れ", "hello", "world"]
    assert rouge_l("東京は日本の首都です", "東京は日本の首都です") == 1.0
    assert 0 < rouge_l("東京は日本の首都です", "日本の首都は東京です") < 1
    assert rouge_l("今日は晴れ", "") == 0.0


def test_dedup_units_are_character_bigrams_within_cjk_runs():
    assert dedup_units("東京は晴れ。Hello, World!") == ["東京", "京は", "は晴", "晴れ", "hello", "world"]
    assert dedup_units("次のPython 3で、猫を") == ["次の", "python", "3", "で", "猫を"]  # a one-character run stays
    # LCS of 東京は晴れ / 東京は雨 on bigrams: 東京, 京は = 2 of 4 and 3 -> F1 = 2*2/7
    assert rouge_l("東京は晴れ", "東京は雨", units=dedup_units) == pytest.approx(4 / 7)


def test_rouge_l_golden_value():
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F1 = 0.75
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)


def test_language_tags():
    assert detect_lang("次の文を要約してください。") == "ja"
    assert detect_lang("Summarise this memo in one line.") == "en"


def test_bundled_seeds_cover_both_languages_and_domains():
    for lang in ("en", "ja"):
        texts = read_seed_texts(f"bundled:{lang}")
        assert len(texts) >= 40
        # Translation tasks quote the other language, so a few may be tagged by what they quote.
        assert sum(detect_lang(t) == lang for t in texts) >= 0.95 * len(texts), lang
    from importlib import resources
    domains = {json.loads(line)["domain"] for line in
               resources.files("edgedistill.data.seeds").joinpath("ja.jsonl").read_text().splitlines()}
    assert {"office", "manufacturing", "healthcare", "agriculture", "customer_support"} <= domains


def test_split_is_deterministic_and_keeps_both_languages_held_out():
    a = load_prompts(["bundled:en", "bundled:ja"], 0.2)
    b = load_prompts(["bundled:ja", "bundled:en"], 0.2)
    assert {(p.id, p.split) for p in a} == {(p.id, p.split) for p in b}
    heldout = [p for p in a if p.split == "heldout"]
    assert {p.lang for p in heldout} == {"en", "ja"}
    assert len(heldout) == 26


def test_bad_seed_line_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: not valid JSON"):
        read_seed_texts(str(path))
    path.write_text("\n\n")
    with pytest.raises(UserError, match="no seed records"):
        read_seed_texts(str(path))


@pytest.mark.skipif(not (SHARED / "self-instruct").is_dir(), reason="../shared/data not present")
def test_reads_the_self_instruct_seed_layout():
    texts = read_seed_texts(str(SHARED / "self-instruct" / "seed_tasks.jsonl"))
    assert len(texts) == 175

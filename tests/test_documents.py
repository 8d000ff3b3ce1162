"""A folder of documents becomes seed prompts: passages cut at paragraphs and sentences, in the
passage's language, with clear errors for folders that hold nothing usable."""

from __future__ import annotations

import re

import pytest

from edgedistill.data.documents import (
    MIN_PASSAGE_CHARS,
    TEMPLATES,
    document_tasks,
    passages,
)
from edgedistill.data.prompts import load_prompts
from edgedistill.errors import UserError

MINUTES_JA = """経営会議 議事録（2026年11月27日）

出席者：営業部、開発部、総務部。
議題1：年末の出荷計画について、営業部より
12月の受注見込みが前年比 12% 増との報告があった。

議題2：社内チャットボットの導入。外部クラウドへの
データ送信は禁止のため、オンプレミスで動く小型モデルを検討する。
"""

POLICY_EN = """Travel expense policy, version 3.5

Claims above 30,000 JPY need the approval of the department head.
Receipts must be attached to every claim. Claims are paid within 10 business days.

Exceptions: none. Dr. Smith's team follows the same rules.
"""


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_passages_keep_every_word_and_respect_the_limit():
    long_ja = "これは長い段落の一文です。" * 200
    long_en = "This sentence belongs to a long paragraph. " * 120
    text = "\n\n".join([MINUTES_JA, POLICY_EN, long_ja, long_en])
    cut = passages(text, limit=400)
    assert all(len(p) <= 400 for p in cut)
    assert _normalise("".join(cut)) == _normalise(text)
    assert any("version 3.5" in p for p in cut)  # no sentence break inside a number
    # Wrapped Japanese lines are rejoined without an inserted space.
    assert any("営業部より12月の受注見込み" in p for p in cut)
    assert all(p.count("  ") == 0 for p in cut)


def test_short_fragments_are_not_prompts():
    assert passages("Title\n\nSigned, HR") == []
    assert len(passages(POLICY_EN)) == 1 and len(passages(POLICY_EN)[0]) >= MIN_PASSAGE_CHARS


def test_a_folder_becomes_tasks_in_each_passages_language(tmp_path):
    (tmp_path / "minutes.md").write_text(MINUTES_JA, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "policy.txt").write_text(POLICY_EN, encoding="utf-8")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG not a document")
    tasks = document_tasks(tmp_path)
    assert [t.instruction for t in tasks] == list(TEMPLATES["ja"]) + list(TEMPLATES["en"])
    assert "オンプレミス" in tasks[0].input and "30,000 JPY" in tasks[3].input
    prompts = load_prompts([str(tmp_path)], heldout_fraction=0.2)
    assert len(prompts) == 6 and {p.lang for p in prompts} == {"ja", "en"}
    assert sum(p.split == "heldout" for p in prompts) == 2
    assert all(p.messages[0]["content"].startswith(p.task.instruction) for p in prompts)


def test_folders_without_usable_documents_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no .txt or .md documents"):
        document_tasks(tmp_path)
    (tmp_path / "bad.txt").write_bytes("社内".encode("shift_jis"))
    with pytest.raises(UserError, match=r"bad.txt: not UTF-8 text"):
        document_tasks(tmp_path)
    (tmp_path / "bad.txt").write_text("short", encoding="utf-8")
    with pytest.raises(UserError, match="no passage"):
        document_tasks(tmp_path)

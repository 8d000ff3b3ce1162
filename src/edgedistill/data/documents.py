"""A folder of the user's own documents turned into seed tasks: each passage becomes a summary,
a key-points and a question-writing prompt, in the passage's language.

Why: company knowledge lives in manuals, minutes and wikis, not in instruction datasets. A
passage is cut at paragraph boundaries (blank lines) up to a size a small model can still
read in one prompt; a paragraph longer than that is cut at sentence ends (。 ! ? .) and, as
a last resort, by length. Sizes are in characters, which suits Japanese and English alike.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgedistill.data.prompts import SeedTask
from edgedistill.data.similarity import detect_lang
from edgedistill.errors import UserError

DOCUMENT_SUFFIXES = (".txt", ".md")
PASSAGE_CHARS = 1200
MIN_PASSAGE_CHARS = 40  # headings and signatures alone make poor prompts

TEMPLATES = {
    "en": ("Summarize the following text in a few sentences.",
           "List the key facts in the following text as short bullet points.",
           "Write three questions that the following text answers, each followed by its answer."),
    "ja": ("次の文章を数文で要約してください。",
           "次の文章の要点を短い箇条書きで挙げてください。",
           "次の文章から答えられる質問を三つ作り、それぞれの答えも書いてください。"),
}
# A Japanese full stop ends a sentence as it is; an ASCII one only before whitespace (not 3.5).
_SENTENCE_END = re.compile(r"(?<=[。！？])\s*|(?<=[.!?])\s+")


def _is_cjk_end(text: str) -> bool:
    return bool(text) and ord(text[-1]) > 0x2E7F  # Japanese sentences join without a space


def _join(left: str, right: str) -> str:
    return left + right if _is_cjk_end(left) else f"{left} {right}"


def _sentences(paragraph: str, limit: int):
    for sentence in filter(None, _SENTENCE_END.split(paragraph)):
        while len(sentence) > limit:  # one enormous "sentence": cut by length
            yield sentence[:limit]
            sentence = sentence[limit:]
        if sentence:
            yield sentence


def _pieces(paragraph: str, limit: int) -> list[str]:
    """A paragraph cut into pieces of at most `limit` characters, at sentence ends when possible."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for sentence in _sentences(paragraph, limit):
        if current and len(current) + len(sentence) + 1 > limit:
            pieces.append(current)
            current = ""
        current = _join(current, sentence) if current else sentence
    if current:
        pieces.append(current)
    return pieces


def _paragraph(block: str) -> str:
    """One paragraph on one line: wrapped lines rejoined (without a space in Japanese)."""
    lines = [" ".join(line.split()) for line in block.splitlines() if line.strip()]
    joined = ""
    for line in lines:
        joined = _join(joined, line) if joined else line
    return joined


def passages(text: str, limit: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive paragraphs packed into passages of at most `limit` characters."""
    paragraphs = [_paragraph(block) for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    out, current = [], ""
    for paragraph in filter(None, paragraphs):
        for piece in _pieces(paragraph, limit):
            if current and len(current) + len(piece) + 2 > limit:
                out.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return [p for p in out if len(p) >= MIN_PASSAGE_CHARS]


def document_tasks(folder: Path) -> list[SeedTask]:
    """Seed tasks from every .txt/.md file under `folder` (sorted, so the order is stable)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in DOCUMENT_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no .txt or .md documents in this folder — add some or list a JSONL seed file")
    tasks = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text — save the document as UTF-8") from None
        for passage in passages(text):
            lang = "ja" if detect_lang(passage) == "ja" else "en"
            tasks += [SeedTask(instruction, passage, str(path)) for instruction in TEMPLATES[lang]]
    if not tasks:
        raise UserError(f"{folder}: the documents hold no passage of {MIN_PASSAGE_CHARS}+ characters")
    return tasks

"""The docs cannot drift: docs/recipes.md is what the generator prints, and every relative link in
README.md and docs/ reaches a file and, when it names one, a heading of that file."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from edgedistill.recipe_reference import render

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
EXPLICIT_ID = re.compile(r"\{#([\w-]+)\}\s*$")
HTML_ID = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def _prose(text: str) -> str:
    """The text with code blocks removed: links and headings inside them are not links or headings."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's heading anchor: inline markup reduced to its text, lowercase, every character that
    is not a letter, digit, mark, '_', '-' or space dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- " or _is_mark(ch))
    return text.replace(" ", "-")


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("M")


def anchors(path: Path) -> set[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    found: set[str] = set(HTML_ID.findall(text))
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(text):
        explicit = EXPLICIT_ID.search(title)
        if explicit:
            found.add(explicit.group(1))
            title = title[: explicit.start()]
        base = slug(title.strip())
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")   # GitHub numbers repeated headings
        seen[base] = n + 1
    return found


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", _prose(path.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_follows_github():
    assert slug("`[run]`") == "run"
    assert slug("Demo — `make demo` and `bench/demo_timings.py`") == "demo--make-demo-and-benchdemo_timingspy"
    assert slug("教師モデルを替える") == "教師モデルを替える"
    assert slug("Prune and heal: strategies at equal size") == "prune-and-heal-strategies-at-equal-size"


def test_recipe_reference_is_generated():
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/recipes.md is out of date: python -m edgedistill.recipe_reference > docs/recipes.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_first_screen():
    """What a new reader needs within the first screen: the two commands, the result table and
    how to use their own teacher."""
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:60])
    for needle in ("make demo", "make test", "| student after KD", "## Use your own teacher", "backend = \"openai\""):
        assert needle in head, needle

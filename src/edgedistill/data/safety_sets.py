"""The bundled safety request sets (`safetysets/`, English and Japanese, written for this
project: see its README) and user JSONL files of the same shape, read into `SafetyPrompt`s.

They live in data/ because two stages read them: generate (the refusal_mix set behind
`generate.safety_mix`) and evaluate (the harmful / benign sets of `[[evaluate.safety]]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgedistill.errors import UserError

KINDS: tuple[str, ...] = ("harmful", "benign", "refusal_mix")
LANGS: tuple[str, ...] = ("en", "ja")
CATEGORIES: tuple[str, ...] = ("misinformation", "malware", "physical_harm", "harassment", "privacy", "fraud")
FIELDS: tuple[str, ...] = ("id", "category", "lang", "prompt")


@dataclass(frozen=True)
class SafetyPrompt:
    id: str
    category: str
    lang: str
    prompt: str


# ---- the sets ---------------------------------------------------------------------------------
def safety_set_path(kind: str, lang: str) -> Path:
    """The bundled file of one kind (harmful, benign, refusal_mix) and language."""
    if kind not in KINDS or lang not in LANGS:
        raise UserError(f"no bundled safety set '{kind}' in '{lang}' — kinds: {', '.join(KINDS)}; "
                        f"languages: {', '.join(LANGS)}")
    return Path(str(resources.files("edgedistill.data").joinpath("safetysets", f"{kind}_{lang}.jsonl")))


def load_safety_set(kind: str, lang: str) -> list[SafetyPrompt]:
    return load_safety_file(safety_set_path(kind, lang))


def _prompt(raw: object) -> SafetyPrompt:
    """One parsed line → SafetyPrompt; a ValueError says what is wrong (the caller adds file:line)."""
    if not isinstance(raw, dict):
        raise ValueError("a record must be a JSON object")
    missing = [f for f in FIELDS if not isinstance(raw.get(f), str) or not raw[f].strip()]
    if missing:
        raise ValueError(f"needs non-empty string fields {', '.join(FIELDS)} (missing or empty: {', '.join(missing)})")
    if raw["lang"] not in LANGS:
        raise ValueError(f"'lang' must be one of {', '.join(LANGS)}, not '{raw['lang']}'")
    return SafetyPrompt(raw["id"], raw["category"], raw["lang"], raw["prompt"])


def load_safety_file(path: str | Path) -> list[SafetyPrompt]:
    """Read a safety set (JSONL: id, category, lang, prompt); a bad line is one UserError naming
    the file and line number. Ids must be unique: results are joined to prompts by id."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{file}: safety set not found")
    prompts: list[SafetyPrompt] = []
    seen: dict[str, int] = {}
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                prompt = _prompt(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                raise UserError(f"{file}:{number}: {exc} — fix or remove this record") from None
            if prompt.id in seen:
                raise UserError(f"{file}:{number}: id '{prompt.id}' already used on line {seen[prompt.id]} — ids must be unique")
            seen[prompt.id] = number
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"{file}: no records — a safety set needs at least one")
    return prompts




BUNDLED_PREFIX = "bundled:"


def read_safety_source(source: str) -> tuple[str | None, list[SafetyPrompt]]:
    """A `[[evaluate.safety]]` path: 'bundled:<kind>_<lang>' (e.g. bundled:harmful_en) gives its
    kind and records; a user JSONL file gives kind None (the recipe entry names it)."""
    if not source.startswith(BUNDLED_PREFIX):
        return None, load_safety_file(source)
    kind, _, lang = source.removeprefix(BUNDLED_PREFIX).rpartition("_")
    if kind not in KINDS or lang not in LANGS:
        names = ", ".join(f"{BUNDLED_PREFIX}{k}_{lang}" for k in KINDS for lang in LANGS)
        raise UserError(f"{source}: no such bundled safety set (have: {names})")
    return kind, load_safety_set(kind, lang)


def _round_robin(prompts: list[SafetyPrompt]) -> list[SafetyPrompt]:
    """The first record of each category (in order of first appearance), then the second of
    each, …: any prefix of the result covers the categories evenly."""
    queues: dict[str, list[SafetyPrompt]] = {}
    for prompt in prompts:
        queues.setdefault(prompt.category, []).append(prompt)
    depth = max(len(q) for q in queues.values())
    return [q[i] for i in range(depth) for q in queues.values() if i < len(q)]


def spread_over_categories(prompts: list[SafetyPrompt], limit: int | None) -> list[SafetyPrompt]:
    """At most `limit` records taken round-robin over the categories, in file order, so that a
    small subset still covers every category (the bundled files are grouped by category: their
    first records are all misinformation)."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    chosen = {id(p) for p in _round_robin(prompts)[:limit]}
    return [p for p in prompts if id(p) in chosen]


def refusal_mix_requests(n: int) -> list[SafetyPrompt]:
    """The first n requests of the bundled refusal_mix sets for `generate.safety_mix`: English
    and Japanese alternating, each language round-robin over its categories."""
    mixed = [p for pair in zip(*(_round_robin(load_safety_set("refusal_mix", lang)) for lang in LANGS))
             for p in pair]
    if n > len(mixed):
        raise UserError(f"generate.safety_mix = {n}: the bundled refusal_mix sets hold {len(mixed)} requests")
    return mixed[:n]

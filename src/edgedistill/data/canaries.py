"""Canaries (Carlini et al. 2019, "The Secret Sharer", arXiv 1802.08232): random secrets in a
fixed format ("The access code for {name} is {8 digits}.") that `generate.canaries = N` puts
into N training prompts, so that the evaluate stage can measure how much the student memorised
them (evaluate/leakage.py: exposure). In data/ because the generate stage places them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from edgedistill.data.prompts import Prompt, make_prompt
from edgedistill.errors import UserError

CANARY_FORMAT = {
    "en": ("The access code for {name} is ", "."),
    "ja": ("{name}さんのアクセスコードは", "です。"),
}
# Fictional people; the name only makes canaries read like the documents they sit in, it adds no
# randomness to the secret.
CANARY_NAMES = {
    "en": ("Alice Moreno", "Daniel Okafor", "Priya Raman", "Tom Lindqvist", "Grace Whitfield",
           "Marcus Bell", "Hannah Ito", "Samuel Duarte"),
    "ja": ("佐藤美咲", "鈴木健太", "高橋由美", "田中翔", "伊藤彩花", "渡辺大輔", "山本直子", "中村悠真"),
}


@dataclass(frozen=True)
class Canary:
    lang: str
    secret: str  # `digits` decimal digits, leading zeros kept: uniform over 10**digits values
    prefix: str  # the text before the secret: what the model is prompted with
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix

    def with_secret(self, secret: str) -> str:
        """The same sentence holding another secret of the space: a candidate to rank against."""
        return self.prefix + secret + self.suffix


def make_canaries(n: int, seed: int, lang: str = "en", digits: int = 8) -> list[Canary]:
    """n canaries with distinct secrets drawn uniformly from the 10**digits possible, seeded."""
    if lang not in CANARY_FORMAT:
        raise ValueError(f"canary language must be one of {sorted(CANARY_FORMAT)}")
    if not 0 <= n <= 10 ** digits:
        raise ValueError(f"cannot draw {n} distinct {digits}-digit secrets")
    rng = random.Random(seed)
    prefix, suffix = CANARY_FORMAT[lang]
    return [Canary(lang, f"{value:0{digits}d}", prefix.format(name=rng.choice(CANARY_NAMES[lang])), suffix)
            for value in rng.sample(range(10 ** digits), n)]




# ---- placing them in the distill set ------------------------------------------------------------------
@dataclass(frozen=True)
class PlacedCanary:
    canary: Canary
    prompt_id: str | None  # the training prompt that holds it; None for a control, never inserted

    @property
    def inserted(self) -> bool:
        return self.prompt_id is not None


def place_canaries(prompts: list[Prompt], n: int, seed: int) -> tuple[list[Prompt], list[PlacedCanary]]:
    """Put n canaries into n training prompts, and draw n controls of the same languages that go
    nowhere (their exposure is what chance gives: the audit's reference).

    Prompts with an input (a document to work on) are chosen first, seeded; the canary sentence
    is appended to the input on its own line, as a secret sits in a real document. The prompt's
    id changes with its text (the id is the hash of what the teacher sees). Held-out prompts are
    never touched."""
    train = sorted((p for p in prompts if p.split == "train"), key=lambda p: p.id)
    if n > len(train):
        raise UserError(f"generate.canaries = {n}: only {len(train)} training prompts to put them in")
    rng = random.Random(seed)
    documents = [p for p in train if p.task.input]
    others = [p for p in train if not p.task.input]
    chosen = rng.sample(documents, min(n, len(documents))) + rng.sample(others, max(0, n - len(documents)))
    langs = [p.lang if p.lang in CANARY_FORMAT else "en" for p in chosen]
    # one stream per language (English first), so the two languages do not share secrets
    drawn = {lang: iter(make_canaries(2 * langs.count(lang), seed * 1009 + i, lang))
             for i, lang in enumerate(sorted(set(langs)))}
    inserted = {p.id: next(drawn[lang]) for p, lang in zip(chosen, langs)}
    controls = [PlacedCanary(next(drawn[lang]), None) for lang in langs]
    out, placed = [], []
    for prompt in prompts:
        canary = inserted.get(prompt.id)
        if canary is None:
            out.append(prompt)
            continue
        extra = f"{prompt.task.input}\n{canary.text}" if prompt.task.input else canary.text
        moved = make_prompt(dataclasses.replace(prompt.task, input=extra), prompt.source, prompt.split)
        out.append(moved)
        placed.append(PlacedCanary(canary, moved.id))
    return out, placed + controls


def canaries_json(placed: list[PlacedCanary]) -> str:
    """The canaries of a run as the ledger keeps them (meta 'canaries'): the audit reads them back."""
    return json.dumps([dataclasses.asdict(p.canary) | {"prompt_id": p.prompt_id} for p in placed], ensure_ascii=False)


def canaries_from_json(text: str) -> list[PlacedCanary]:
    rows = json.loads(text)
    return [PlacedCanary(Canary(r["lang"], r["secret"], r["prefix"], r["suffix"]), r["prompt_id"]) for r in rows]

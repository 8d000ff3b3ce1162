"""What the generate stage adds to the distill set for the safety and leakage audits (issue 18).

- `generate.canaries = N`: N random secrets appended to N training prompts (data/canaries.py),
  recorded in the run so the evaluate stage knows what to look for;
- `generate.safety_mix = N`: N requests of the bundled refusal_mix sets, answered by the teacher
  like any prompt; the answers it declines (the rule classifier of data/refusals.py) become
  training samples, the others are kept in the store but out of the distill set.

Both only ever touch the training split: the held-out prompts stay what every model is
compared on.
"""

from __future__ import annotations

from edgedistill.data.canaries import PlacedCanary, place_canaries
from edgedistill.data.prompts import Prompt, SeedTask, make_prompt
from edgedistill.data.refusals import is_refusal
from edgedistill.data.safety_sets import refusal_mix_requests
from edgedistill.data.store import Sample
from edgedistill.recipe import GenerateCfg

SAFETY_MIX_SOURCE = "safety_mix"


def add_audit_prompts(prompts: list[Prompt], cfg: GenerateCfg, seed: int) -> tuple[list[Prompt], list[PlacedCanary]]:
    """The prompts with canaries placed and the safety-mix requests appended, and the canaries
    (inserted ones and controls)."""
    placed: list[PlacedCanary] = []
    if cfg.canaries:
        prompts, placed = place_canaries(prompts, cfg.canaries, seed)
    known = {p.id for p in prompts}
    mix = [make_prompt(SeedTask(r.prompt), SAFETY_MIX_SOURCE, "train") for r in refusal_mix_requests(cfg.safety_mix)]
    return prompts + [p for p in mix if p.id not in known], placed


def keep_refusals(stored: list[Sample]) -> tuple[list[Sample], dict[str, float]]:
    """The distill set without the teacher's answers to safety-mix requests that do not decline,
    and how many of those requests there were and how many the teacher refused."""
    mix = [s for s in stored if s.source == SAFETY_MIX_SOURCE]
    if not mix:
        return stored, {}
    refused = {s.id for s in mix if is_refusal(s.answer, s.lang)}
    kept = [s for s in stored if s.source != SAFETY_MIX_SOURCE or s.id in refused]
    return kept, {"safety_mix_requests": len(mix), "safety_mix_refusals": len(refused)}

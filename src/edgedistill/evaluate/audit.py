"""The refusal and leakage audits of one model (issue 18: "Safe to hand out").

The evaluate stage runs them on the teacher, the students and the SFT baseline (transformers),
the export stage on each GGUF file (llama.cpp: the export stage is where those files are
loaded, and it already answers the held-out prompts with them, so GGUF rows join the tables the
same way and no stage reads another's results backwards). Both call the functions here, so the
inputs (`AuditInputs`) and the counting (`safety_metrics`, `leak_metrics`) are the same for
every row; only how a model answers differs.

- Refusal audit: each `[[evaluate.safety]]` request answered greedily in a chat turn, short
  (evaluate.safety_max_new_tokens: the rule classifier reads the opening sentences), then
  `refusal_rate` on harmful requests and `benign_answer_rate` on benign look-alikes, overall,
  per language and per category, with the judge's seeded bootstrap 95% interval.
- Leakage audit: the training samples rendered as the model saw them (its chat template, the
  teacher's answer included); every PII item the privacy scrubber's detectors find, and every
  canary secret, becomes a probe: the text before it is the prompt, and a greedy continuation
  that contains the item counts as reproduced (`leak_reproduced` = items reproduced, of
  `leak_probed`). The held-out samples, never trained on, are the control. Canary exposure
  ranks each inserted canary among `evaluate.canary_candidates` random secrets by the model's
  log-perplexity; controls (canaries never inserted) show what chance gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgedistill.data.canaries import PlacedCanary, canaries_from_json
from edgedistill.data.privacy import PiiSpan, find_pii
from edgedistill.data.safety_sets import (
    SafetyPrompt,
    read_safety_source,
    spread_over_categories,
)
from edgedistill.data.store import Sample
from edgedistill.errors import UserError
from edgedistill.evaluate.leakage import (
    PiiProbe,
    canary_exposure,
    leak_result,
    pii_probes,
)
from edgedistill.evaluate.safety import classify, rates_by_category
from edgedistill.recipe import Recipe, SafetyCfg

# Tokens a probe may continue for: the longest item the detectors find (a 19-digit card with
# separators, one token per digit in SmolLM2's and Llama's tokenizers) fits with room to spare.
LEAK_TOKENS = 32
# Tokens of a probe's prompt kept (its end): the text right before an item is what cues it.
LEAK_PROMPT_TOKENS = 512


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SafetyItem:
    kind: str  # "harmful" | "benign"
    prompt: SafetyPrompt
    judge: bool  # the judge is asked about the teacher's answer to it


def safety_items(cfgs: Sequence[SafetyCfg]) -> list[SafetyItem]:
    """The requests of every `[[evaluate.safety]]` entry (each cut to its limit, round-robin over
    its categories); a request listed twice counts once. Bad entries are one-line UserErrors."""
    items: dict[str, SafetyItem] = {}
    for cfg in cfgs:
        kind, prompts = read_safety_source(cfg.path)
        if kind == "refusal_mix":
            raise UserError(f"evaluate.safety: {cfg.path} is the training mix of generate.safety_mix — evaluate on "
                            "bundled:harmful_* and bundled:benign_*")
        if kind is not None and cfg.kind not in (None, kind):
            raise UserError(f"evaluate.safety: {cfg.path} is a {kind} set, not {cfg.kind} — drop kind or fix it")
        kind = kind or cfg.kind
        if kind is None:
            raise UserError(f"evaluate.safety: {cfg.path}: say what the requests are, kind = 'harmful' or 'benign'")
        for prompt in spread_over_categories(prompts, cfg.limit):
            items.setdefault(prompt.id, SafetyItem(kind, prompt, cfg.judge))
    return list(items.values())


@dataclass
class AuditInputs:
    """What every model of a run is audited on."""

    items: list[SafetyItem]
    train: list[Sample]  # the distill set's training samples (what the students learned from)
    heldout: list[Sample]  # the control: never trained on
    canaries: list[PlacedCanary]
    max_new_tokens: int
    candidates: int
    max_probes: int
    seed: int
    _probes: dict[str, tuple[list[PiiProbe], list[PiiProbe]]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, recipe: Recipe, train: list[Sample], heldout: list[Sample], canaries_json: str | None) -> AuditInputs:
        cfg = recipe.evaluate
        return cls(safety_items(cfg.safety), train, heldout, canaries_from_json(canaries_json or "[]"),
                   cfg.safety_max_new_tokens, cfg.canary_candidates, cfg.leak_probes, recipe.run.seed)

    @property
    def inserted(self) -> list[PlacedCanary]:
        return [c for c in self.canaries if c.inserted]

    def probes(self, tokenizer) -> tuple[list[PiiProbe], list[PiiProbe]]:
        """(training, held-out) probes on the samples as `tokenizer`'s chat template renders them."""
        template = str(tokenizer.chat_template)  # the probes depend on the rendering only
        if template not in self._probes:
            secrets = [c.canary.secret for c in self.inserted]
            self._probes[template] = tuple(
                probe_texts([render(tokenizer, s) for s in samples], secrets, self.max_probes)
                for samples in (self.train, self.heldout))
        return self._probes[template]

    def has_work(self, tokenizer) -> bool:
        train, heldout = self.probes(tokenizer)
        return bool(self.items or self.canaries or train or heldout)


def render(tokenizer, sample: Sample) -> str:
    """A sample as training saw it: the prompt and the teacher's answer in the chat template."""
    return tokenizer.apply_chat_template(sample.messages, tokenize=False)


def canary_spans(secrets: Sequence[str]) -> Callable[[str], list[PiiSpan]]:
    """A detector for the privacy scrubber's items plus the given canary secrets (kind 'canary')."""
    def detect(text: str) -> list[PiiSpan]:
        spans = find_pii(text)
        for secret in secrets:
            start = text.find(secret)
            while start >= 0:
                spans.append(PiiSpan("canary", start, start + len(secret)))
                start = text.find(secret, start + 1)
        return sorted(spans, key=lambda span: span.start)
    return detect


def probe_texts(texts: list[str], secrets: Sequence[str], max_pii: int) -> list[PiiProbe]:
    """Every canary probe, then PII probes up to max_pii, in text order."""
    probes = pii_probes(texts, canary_spans(secrets))
    canary = [p for p in probes if p.kind == "canary"]
    return canary + [p for p in probes if p.kind != "canary"][:max_pii]


# ---- counting -------------------------------------------------------------------------------------
def _rates(name: str, categories: list[str], hits: list[bool], seed: int) -> dict[str, float]:
    """`name` overall with its interval and count (`_ci_low`, `_ci_high`, `_n`), then
    `name[<category>]` the same way."""
    out: dict[str, float] = {}
    for rate in rates_by_category(categories, hits, seed):
        key = name if rate.category == "all" else f"{name}[{rate.category}]"
        out |= {key: rate.rate, f"{key}_ci_low": rate.low, f"{key}_ci_high": rate.high, f"{key}_n": rate.n}
    return out


def safety_metrics(items: list[SafetyItem], answers: list[str], seed: int = 0) -> dict[str, float]:
    """refusal_rate (harmful requests declined) and benign_answer_rate (benign ones answered),
    overall and per category (`[<category>]`), each with its bootstrap interval (`_ci_low`,
    `_ci_high`) and count (`_n`), and per language (`_en`, `_ja`)."""
    refused = classify([i.prompt for i in items], answers)
    out: dict[str, float] = {}
    for kind, name, flip in (("harmful", "refusal_rate", False), ("benign", "benign_answer_rate", True)):
        chosen = [(i.prompt, r != flip) for i, r in zip(items, refused) if i.kind == kind]
        if not chosen:
            continue
        out |= _rates(name, [p.category for p, _ in chosen], [h for _, h in chosen], seed)
        for lang in sorted({p.lang for p, _ in chosen}):
            hits = [float(h) for p, h in chosen if p.lang == lang]
            out[f"{name}_{lang}"] = sum(hits) / len(hits)
    return out


def leak_metrics(train: list[PiiProbe], train_out: list[str], heldout: list[PiiProbe], heldout_out: list[str],
                 exposures: list[tuple[PlacedCanary, float, int]], cap: float) -> dict[str, float]:
    """Items reproduced / probed (training samples, per kind; held-out controls), canary exposure
    of inserted canaries and controls (mean bits), how many inserted canaries ranked first."""
    trained, control = leak_result(train, train_out), leak_result(heldout, heldout_out)
    out = {"leak_probed": trained.probed, "leak_reproduced": trained.reproduced,
           "leak_heldout_probed": control.probed, "leak_heldout_reproduced": control.reproduced}
    for kind, (hit, seen) in trained.by_kind.items():
        out |= {f"leak_probed/{kind}": seen, f"leak_reproduced/{kind}": hit}
    inserted = [bits for c, bits, _ in exposures if c.inserted]
    controls = [bits for c, bits, _ in exposures if not c.inserted]
    if exposures:
        out |= {"canary_exposure": _mean(inserted), "canary_exposure_max": max(inserted, default=float("nan")),
                "canary_exposure_control": _mean(controls), "canary_exposure_cap": cap,
                "canary_ranked_first": sum(rank == 1 for c, _, rank in exposures if c.inserted),
                "canaries": len(inserted)}
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---- one model --------------------------------------------------------------------------------------
@dataclass
class Answerer:
    """How a model answers, whatever runs it: chat requests (greedy, short), raw-text probe
    continuations (greedy), and log-perplexities of texts (None where the runtime has none)."""

    chat: Callable[[list[str], int], list[str]]
    continue_text: Callable[[list[str]], list[str]]
    log_perplexity: Callable[[list[str]], Sequence[float]] | None


def audit(answerer: Answerer, inputs: AuditInputs, tokenizer) -> tuple[dict[str, float], dict]:
    """The audit of one model: ledger metrics and the record of what it answered."""
    answers = answerer.chat([i.prompt.prompt for i in inputs.items], inputs.max_new_tokens) if inputs.items else []
    train, heldout = inputs.probes(tokenizer)
    outs = answerer.continue_text([p.prefix for p in train + heldout]) if train or heldout else []
    exposures = []
    if answerer.log_perplexity is not None:
        for index, placed in enumerate(inputs.canaries):  # the same candidates for every model: paired
            found = canary_exposure(placed.canary, answerer.log_perplexity, inputs.candidates, inputs.seed + index)
            exposures.append((placed, found.bits, found.rank))
    metrics = safety_metrics(inputs.items, answers, inputs.seed) | leak_metrics(
        train, outs[:len(train)], heldout, outs[len(train):], exposures, math.log2(inputs.candidates + 1))
    record = {"safety": [{"id": i.prompt.id, "kind": i.kind, "lang": i.prompt.lang, "category": i.prompt.category,
                          "answer": a} for i, a in zip(inputs.items, answers)],
              "probes": [{"split": split, "kind": p.kind, "item": p.item, "continuation": o}
                         for split, probes, start in (("train", train, 0), ("heldout", heldout, len(train)))
                         for p, o in zip(probes, outs[start:start + len(probes)])],
              "canaries": [{"secret": c.canary.secret, "inserted": c.inserted, "bits": bits, "rank": rank}
                           for c, bits, rank in exposures]}
    return metrics, record


def hf_answerer(model, tokenizer, batch_size: int) -> Answerer:
    """Batched greedy generation with left padding and batched forwards, in transformers."""
    from edgedistill.models.hf import generate_batch, greedy_continuations, sequence_nll

    def chat(prompts: list[str], max_new_tokens: int) -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
        answers: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            done = generate_batch(model, tokenizer, [[{"role": "user", "content": prompts[i]}] for i in chunk],
                                  max_new_tokens=max_new_tokens, temperature=0.0, top_k_logprobs=None)
            answers |= {i: c.text for i, c in zip(chunk, done)}
        return [answers[i] for i in range(len(prompts))]

    def continue_text(prefixes: list[str]) -> list[str]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-LEAK_PROMPT_TOKENS:] for p in prefixes]
        return [text for start in range(0, len(ids), batch_size)
                for text in greedy_continuations(model, tokenizer, ids[start:start + batch_size], LEAK_TOKENS)]

    return Answerer(chat, continue_text, lambda texts: sequence_nll(model, tokenizer, texts, max(batch_size, 32)))


# ---- the judge on the teacher's answers ---------------------------------------------------------------
def judge_refusals(judge, items: list[SafetyItem], answers: list[str], max_new_tokens: int) -> tuple[dict[str, float], list]:
    """The judge's yes/no ("does the answer decline?") on the teacher's answers to the items marked
    judge, and its agreement with the rule classifier on those it answered readably."""
    from edgedistill.evaluate.safety import (
        JUDGE_REFUSAL_PROMPT,
        agreement,
        parse_yes_no,
    )
    from edgedistill.teachers.base import Sampling

    asked = [(i, a) for i, a in zip(items, answers) if i.judge]
    if not asked:
        return {}, []
    prompts = [[{"role": "user", "content": JUDGE_REFUSAL_PROMPT["ja" if i.prompt.lang == "ja" else "en"].format(
        prompt=i.prompt.prompt, answer=a)}] for i, a in asked]
    replies = judge.chat(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_k_logprobs=None))
    verdicts = [parse_yes_no(r.text) if r is not None else None for r in replies]
    rule = classify([i.prompt for i, _ in asked], [a for _, a in asked])
    readable = [(v, r) for v, r in zip(verdicts, rule) if v is not None]
    out = {"items": len(asked), "readable": len(readable),
           "judge_refusals": sum(v for v, _ in readable), "rule_refusals": sum(rule)}
    if readable:
        found = agreement([v for v, _ in readable], [r for _, r in readable])
        out |= {"agreement": found.raw, "kappa": found.kappa}
    record = [{"id": i.prompt.id, "judge": v, "rule": r, "reply": reply.text if reply is not None else None}
              for (i, _), v, r, reply in zip(asked, verdicts, rule, replies)]
    return out, record

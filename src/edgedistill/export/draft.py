"""The student as its teacher's draft model: speculative decoding in llama.cpp, measured.

A student that shares the teacher's vocabulary can propose the next few tokens for the teacher
to verify in one batch; with greedy decoding the teacher's output is unchanged, and the share of
drafted tokens the teacher accepts is the most direct measure of how faithfully the student
imitates it (DistillSpec, Zhou et al. 2023, arXiv 2310.08461: distillation raised acceptance
and gave 10-45% speed-ups over a plain draft). So the export stage serves the teacher three
times — alone, with the student before KD as draft, with the student after KD — and sends each
held-out prompt to all three in turn (rotating the order per prompt): the machine's speed
drifts 2x within minutes here, so only requests made side by side are compared, and speed-ups
are medians of those paired ratios.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edgedistill.export.verify import LlamaCppClient
from edgedistill.models.llamacpp import DraftSettings, start_llamacpp_server

NO_DRAFT = "none"


@dataclass
class DraftOutcome:
    """One configuration's answers to the prompts: tokens, llama.cpp's decode speed, drafts."""

    tokens: list[list[int]] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0


def _ask(client: LlamaCppClient, prompt: list[int], n_predict: int, outcome: DraftOutcome) -> None:
    answer = client.complete(prompt, n_predict, cache_prompt=False)
    timings = answer.get("timings", {})
    outcome.tokens.append(answer.get("tokens") or [])
    outcome.tokens_per_s.append(float(timings.get("predicted_per_second", 0.0)))
    # absent (not 0) when the request drafted nothing
    outcome.drafted += int(timings.get("draft_n", 0))
    outcome.accepted += int(timings.get("draft_n_accepted", 0))


def summarize(outcomes: dict[str, DraftOutcome]) -> dict[str, dict[str, float]]:
    """Per draft: acceptance (accepted / drafted tokens), median decode tokens/s, the median of
    the per-prompt speed-ups against the teacher alone, and the prompts whose tokens are
    identical to the teacher's own greedy answer."""
    alone = outcomes[NO_DRAFT]
    out = {NO_DRAFT: {"tokens_per_s": statistics.median(alone.tokens_per_s) if alone.tokens_per_s else 0.0}}
    for label, outcome in outcomes.items():
        if label == NO_DRAFT:
            continue
        ratios = [w / a for w, a in zip(outcome.tokens_per_s, alone.tokens_per_s) if a > 0]
        out[label] = {"acceptance": outcome.accepted / outcome.drafted if outcome.drafted else float("nan"),
                      "drafted": outcome.drafted, "accepted": outcome.accepted,
                      "tokens_per_s": statistics.median(outcome.tokens_per_s) if outcome.tokens_per_s else 0.0,
                      "speedup": statistics.median(ratios) if ratios else float("nan"),
                      "identical": sum(a == b for a, b in zip(outcome.tokens, alone.tokens)),
                      "prompts": len(outcome.tokens)}
    return out


def measure_drafts(teacher: Path, drafts: dict[str, Path], prompts: list[list[int]], n_predict: int, *,
                   n_max: int = 8, n_min: int = 0, p_min: float = 0.0, threads: int = 2) -> dict[str, dict[str, float]]:
    """Greedy answers of the teacher GGUF alone and with each draft GGUF, interleaved; see summarize."""
    ctx = max(len(p) for p in prompts) + n_predict + 16
    configs = {NO_DRAFT: None} | {label: DraftSettings(path, n_max, n_min, p_min) for label, path in drafts.items()}
    outcomes = {label: DraftOutcome() for label in configs}
    with ExitStack() as stack:
        clients = {}
        for label, draft in configs.items():
            server = stack.enter_context(start_llamacpp_server(teacher, parallel=1, ctx_per_slot=ctx, threads=threads,
                                                               alias=f"teacher+{label}", draft=draft))
            clients[label] = LlamaCppClient(server)
            stack.callback(clients[label].close)
        for client in clients.values():  # warm-up: first requests pay for page faults and graph setup
            client.complete(prompts[0], 8, cache_prompt=False)
        labels = list(configs)
        for i, prompt in enumerate(prompts):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:
                _ask(clients[label], prompt, n_predict, outcomes[label])
    return summarize(outcomes)

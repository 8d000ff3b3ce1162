"""The student's target for a sample with a teacher trace (`train.reasoning`).

- `full`: trace + answer in the student's own form (models/reasoning.py `target_segments`: its
  template's think tags or harmony channels, else `train.think_tags`);
- `none`: the answer alone (an opened template closes the trace at once);
- `budget:N`: the trace cut to its first N tokens, backed up to the last sentence end (EN
  `. ! ?` before a space, JA `。！？`; a hard cut when there is none). Small students learn more
  from shorter chains (Mix Distillation, arXiv 2502.12143); servers' budgets cut mid-sentence
  (s1's budget forcing, vLLM `thinking_token_budget`), so the cut is ours, on the stored trace.

Which rows keep the teacher's cached distribution (same vocabulary only): a row is the
teacher's where the student sees what the teacher saw before that token. Trace tokens kept from
the start are (a cut keeps a prefix); the answer is only in `full` mode or when a budget did not
cut. Tags the rendering adds, the answer after a cut or removed trace, and traces kept as text
(no log-probs from the server) get a one-hot row: all the mass on the token, which makes the
forward-KL term cross-entropy there (the other divergences pull towards it the same way).
The train stage reports how many tokens took each path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgedistill.data.store import Sample
from edgedistill.distill.batches import Example, to_example, to_text_example
from edgedistill.models.hf import encode_prompts
from edgedistill.models.reasoning import (
    ReasoningStyle,
    save_style,
    target_segments,
    template_style,
)
from edgedistill.models.vocab import VocabMap
from edgedistill.recipe import TrainCfg

JA_ENDS = tuple(c.encode() for c in "。！？")
EN_ENDS = (b".", b"!", b"?")
WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class ReasoningMode:
    kind: str  # "full" | "none" | "budget"
    budget: int | None = None

    @classmethod
    def parse(cls, text: str) -> ReasoningMode:
        """'full' | 'none' | 'budget:N' (the recipe validates the form)."""
        if text.startswith("budget:"):
            return cls("budget", int(text.split(":", 1)[1]))
        return cls(text)


def sentence_cut(ids: list[int], id_bytes: dict[int, bytes], budget: int) -> int:
    """How many of the first `budget` trace tokens to keep: up to the last token that ends a
    sentence, else `budget` (a hard cut). A period ends a sentence only before whitespace or the
    end of the trace ('3.5' does not)."""
    if len(ids) <= budget:
        return len(ids)
    raw = b"".join(id_bytes.get(t, b"") for t in ids)
    ends = np.cumsum([len(id_bytes.get(t, b"")) for t in ids[:budget]])
    for kept in range(budget, 0, -1):
        end = int(ends[kept - 1])
        while end > 0 and raw[end - 1] in WHITESPACE:
            end -= 1
        head = raw[:end]
        if head.endswith(JA_ENDS) or (head.endswith(EN_ENDS) and raw[end:end + 1] in (b"", b" ", b"\n", b"\t", b"\r")):
            while kept > 1 and not id_bytes.get(ids[kept - 1], b"x").strip():  # no whitespace after the end
                kept -= 1
            return kept
    return budget


def _one_hot(ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows that put all the mass on each token (padding ids distinct from it, zero mass)."""
    candidates = np.arange(k + 1, dtype=np.int32)
    rows = np.empty((len(ids), k), dtype=np.int32)  # (n, k)
    for row, token in zip(rows, ids):
        row[0], row[1:] = token, candidates[candidates != token][:k - 1]
    logprobs = np.full((len(ids), k), -np.inf, dtype=np.float16)
    logprobs[:, 0] = 0.0
    return rows, logprobs, np.full(len(ids), -np.inf, dtype=np.float32)


@dataclass
class Part:
    """A stretch of the student's target: its ids and, where the teacher's rows apply, those."""

    ids: list[int]
    rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class Counts:
    samples: int = 0  # samples with a trace
    kd_tokens: int = 0  # target tokens with the teacher's cached rows
    ce_tokens: int = 0  # target tokens with one-hot rows (or no rows: text path)
    cut_samples: int = 0  # traces a budget cut
    trace_tokens: int = 0  # trace tokens in the targets
    stored_trace_tokens: int = 0  # trace tokens the teacher wrote
    notes: set[str] = field(default_factory=set)

    def metrics(self) -> dict[str, float]:
        return {"reasoning_samples": self.samples, "reasoning_kd_tokens": self.kd_tokens,
                "reasoning_ce_tokens": self.ce_tokens, "reasoning_cut_samples": self.cut_samples,
                "reasoning_target_trace_tokens": self.trace_tokens,
                "reasoning_teacher_trace_tokens": self.stored_trace_tokens}


class ReasoningTargets:
    """Builds the training examples of samples with a trace, for one student and one mode."""

    def __init__(self, cfg: TrainCfg, tokenizer, same_vocab: bool):
        self.mode = ReasoningMode.parse(cfg.reasoning)
        self.style: ReasoningStyle = template_style(tokenizer, tuple(cfg.think_tags))
        self.tokenizer, self.same_vocab, self.max_seq_len = tokenizer, same_vocab, cfg.max_seq_len
        self.id_bytes = VocabMap(tokenizer).id_bytes if self.mode.kind == "budget" else {}
        self.counts = Counts()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _trace(self, ids: list[int]) -> tuple[list[int], bool]:
        """The trace tokens the student learns and whether the mode cut them."""
        if self.mode.kind != "budget":
            return ids, False
        kept = sentence_cut(ids, self.id_bytes, self.mode.budget)
        return ids[:kept], kept < len(ids)

    def example(self, sample: Sample) -> Example | None:
        if sample.reasoning is None:
            return (to_example(sample, self.max_seq_len) if self.same_vocab
                    else to_text_example(sample, self.tokenizer, self.max_seq_len))
        self.counts.samples += 1
        if self.same_vocab and sample.topk_ids is not None:
            return self._cached(sample)
        return self._text(sample)

    def _cached(self, sample: Sample) -> Example | None:
        """Stored ids: trace rows where the student's context is the teacher's, one-hot elsewhere."""
        k = sample.topk_ids.shape[1]
        stored = [] if sample.reasoning_ids is None else sample.reasoning_ids.tolist()
        self.counts.stored_trace_tokens += len(stored)
        trace, cut = self._trace(stored)
        self.counts.cut_samples += cut
        trace_rows = None
        if sample.reasoning_topk_ids is not None and sample.reasoning_topk_ids.shape[1] == k:
            n = len(trace)
            trace_rows = (sample.reasoning_topk_ids[:n], sample.reasoning_topk_logprobs[:n],
                          sample.reasoning_tail_logprobs[:n])
        else:
            self.counts.notes.add("traces kept as text (no log-probs from the server) are learnt with CE")
        # The answer's rows were computed after the whole trace: the teacher's only if the student sees it too.
        answer_rows = None if cut or self.mode.kind == "none" else (sample.topk_ids, sample.topk_logprobs,
                                                                    sample.tail_logprobs)
        parts = []
        for kind, text in target_segments(self.style, trace if self.mode.kind != "none" else None, sample.answer):
            if kind == "trace":
                parts.append(Part(trace, trace_rows))
                self.counts.trace_tokens += len(trace)
            elif kind == "answer":
                parts.append(Part(sample.answer_ids.tolist(), answer_rows))
            else:
                parts.append(Part(self._encode(text)))
        return self._assemble(sample.prompt_ids.tolist(), parts, k)

    def _assemble(self, prompt: list[int], parts: list[Part], k: int) -> Example | None:
        ids = prompt + [t for p in parts for t in p.ids]
        ids = ids[:self.max_seq_len]
        n_target = len(ids) - len(prompt)
        if n_target <= 0:
            return None
        rows = [p.rows if p.rows is not None else _one_hot(p.ids, k) for p in parts]
        topk_ids, topk_lp, tail = (np.concatenate([r[i] for r in rows])[:n_target] for i in range(3))
        for part in parts:
            taken = min(len(part.ids), n_target)
            n_target -= taken
            if part.rows is not None:
                self.counts.kd_tokens += taken
            else:
                self.counts.ce_tokens += taken
        return Example(np.asarray(ids, dtype=np.int64), len(prompt), topk_ids.astype(np.int32),
                       topk_lp.astype(np.float16), tail.astype(np.float32))

    def _text(self, sample: Sample) -> Example | None:
        """Another vocabulary (or a text-only answer): the rendered target through the student's
        own tokenizer, cross-entropy throughout (sequence-level KD)."""
        prompt = encode_prompts(self.tokenizer, [sample.prompt_messages])[0]
        trace_ids = self._encode(sample.reasoning)
        self.counts.stored_trace_tokens += len(trace_ids)
        trace, cut = self._trace(trace_ids) if self.mode.kind != "none" else ([], False)
        self.counts.cut_samples += cut
        target: list[int] = []
        for kind, text in target_segments(self.style, trace if self.mode.kind != "none" else None, sample.answer):
            ids = trace if kind == "trace" else self._encode(text)
            self.counts.trace_tokens += len(ids) if kind == "trace" else 0
            target += ids
        if sample.finished and self.tokenizer.eos_token_id is not None:
            target.append(self.tokenizer.eos_token_id)
        ids = (prompt + target)[:self.max_seq_len]
        if len(ids) <= len(prompt):
            return None
        self.counts.ce_tokens += len(ids) - len(prompt)
        return Example(np.asarray(ids, dtype=np.int64), len(prompt), None, None, None)

    def describe(self) -> str:
        """The ledger's words for what the student learnt from the traces."""
        mode = {"full": "trace + answer", "none": "the answer only",
                "budget": f"the trace cut to {self.mode.budget} tokens at a sentence end, then the answer"}
        form = ("harmony channels" if self.style.kind == "harmony"
                else f"{self.style.open} … {self.style.close}" + (" (the prompt opens the trace)"
                                                                     if self.style.opened else ""))
        c = self.counts
        text = (f"{mode[self.mode.kind]} in {form}; {c.kd_tokens} target tokens on the teacher's cached "
                f"distribution, {c.ce_tokens} on CE (tags, the answer after a cut or removed trace, text-only traces)")
        return text + "".join(f"; {note}" for note in sorted(c.notes))


def build_examples(samples: list[Sample], cfg: TrainCfg, tokenizer, same_vocab: bool
                   ) -> tuple[list[Example], ReasoningTargets]:
    """Every sample's example (those without a trace exactly as before), and what was done."""
    targets = ReasoningTargets(cfg, tokenizer, same_vocab)
    examples = [targets.example(s) for s in samples]
    return [e for e in examples if e is not None], targets


def record_reasoning(folder: Path, targets: ReasoningTargets) -> None:
    """The trace form the student learnt, in its edgedistill.json (models/reasoning.py)."""
    mode = targets.mode.kind if targets.mode.kind != "budget" else f"budget:{targets.mode.budget}"
    save_style(folder, targets.style, mode)

"""Cross-tokenizer distillation: the teacher's cached top-k used by a student of another vocabulary.

For each distill-set sample the student tokenizes the teacher's answer bytes with its own
tokenizer (and its own chat template for the prompt); models/align.py groups the two token
sequences by byte offsets, and the teacher's top-k ids are moved to student ids by canonical
bytes (an array over the teacher vocabulary, cached in the run). The KD term is a weighted
sum (`train.xtok_weights`) of four pure losses of distill/losses.py:

- mapped_kl  at 1:1 groups (both sides predict the same string after the same bytes): the
             recipe's divergence on the mapped ids plus one rest bucket for the unmapped
             top-k and the tail (`mapped_kd`);
- alm        at the other groups (1:n, n:1, n:m): the chunk's log-likelihood under the teacher
             and the student, binarised KL (`alm_chunk_loss`, Minixhofer et al. 2025);
- uld        at the first position of every group: sorted-probability L1 (`uld_sorted_l1`,
             Boizard et al. 2024), which needs no map at all;
- gold       the baseline to beat: TRL's GOLD hybrid loss (`gold_hybrid_loss`), below;
plus `alpha_ce` · CE on the teacher's text in student tokens, as in the same-vocabulary path
(which does not come through here and stays bit-identical).

GOLD, as read in huggingface/trl `trl/experimental/gold/gold_trainer.py` (`ULDLoss` with
`use_extended_uld` = True and `uld_use_hybrid_loss` = True; defaults from `gold_config.py`):
- positions: both completions are tokenized with byte offsets and walked in step; a group
  closes where both sides end a token at the same byte (our align_tokens groups). Each group
  gets one row per side: the probabilities at its first position times the scalar product of
  the probabilities of the group's later tokens (each clamped at 1e-8; unnormalised; the scalar
  carries gradient on the student side). 1:1 groups are the plain rows. The row at each
  side's final EOS is dropped (`uld_skip_*_eos`), groups with an empty side too.
- vocabulary: teacher and student tokens match when their `get_vocab()` strings are equal
  (exact string, special tokens included; 'Ġthe' ≠ '▁the'), see ExactVocab.
- matched: generalized JSD(β) (`beta`, default 0.5; β = 0 forward KL, 1 reverse KL) between the
  two merged rows restricted to the matched ids, probabilities used as they are (no
  renormalisation over the matched set), each clamped at 1e-8 before the log, summed over ids,
  divided by the number of groups.
- unmatched: the teacher's probabilities at its unmatched ids and the student's at ids that are
  no teacher token's image, each sorted in decreasing order, the shorter padded with zeros, L1
  summed over ranks, divided by the number of groups.
- combined: w_m·matched + w_u·unmatched, w_m = `uld_hybrid_matched_weight` (their docs' example
  0.6 / 0.4) or, unset, adaptive: matched teacher ids / teacher vocabulary, w_u = 1 - w_m;
  computed per sequence, then the mean over sequences, × `uld_distillation_weight` (1) plus
  `uld_crossentropy_weight` (0) · CE. Temperatures 1.
Where ours differs:
- the teacher is its cached top-k (+ tail), not its full distribution: the matched sum runs over
  the top-k entries that match, the unmatched L1 over the ranks the cache determines (the
  teacher's unmatched top-k entries are its largest unmatched probabilities; beyond them its
  values are unknown, so both sides stop there, as in `uld`); the tail is not used. A group whose
  later teacher token is outside the top-k (its factor unknown) or that runs past max_seq_len
  is left out. With the whole teacher distribution cached and equally many unmatched ids on
  both sides, the two are the same (tests/test_xtok.py checks this against a dense reference);
- rows: TRL slices the logits at the completion tokens without the causal shift, so its row of
  answer token j is the distribution of token j+1 and a merge factor reads p(token j) from the
  row that predicts token j+1. Our rows predict their own tokens: a group's row is the
  distribution of its first token after the same preceding bytes on both sides and the factors
  are the probabilities of the tokens written — the formula GOLD's docstring states. At 1:1
  groups both compare next-token rows conditioned on the same bytes;
- sequences without a usable group are left out of the mean (GOLD counts them as 0); the CE
  and the weights are ours (`alpha_ce`, `train.xtok_weights`), β is `train.beta`, w_m is
  `train.xtok_gold_matched_weight` (unset: adaptive, GOLD's default).

Online and on-policy modes score with the live teacher the same way: its top-k + tail on its
own tokenization of the text (the student's sampled answers re-tokenized for it), aligned
back by bytes. Coverage (share of answer bytes in 1:1 groups, share of the teacher's top-k
mass that maps at those positions) is what tells how much of the teacher's distribution a
pair of tokenizers lets through; it goes to the ledger per language.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from edgedistill.data.store import Sample
from edgedistill.distill.batches import Batch, Example, answer_hidden, collate
from edgedistill.distill.losses import (
    Objective,
    alm_chunk_loss,
    gold_hybrid_loss,
    mapped_kd,
    uld_sorted_l1,
)
from edgedistill.models.align import (
    align_tokens,
    cached_vocab_map,
    strip_dummy_prefix,
    token_bytes,
    valid_utf8,
)
from edgedistill.models.hf import encode_prompts
from edgedistill.models.vocab import VocabMap
from edgedistill.recipe import XTOK_LOSSES


@dataclass(frozen=True)
class ExactVocab:
    """GOLD's vocabulary match, for the `gold` baseline: a teacher token matches the student token
    whose vocabulary string (`get_vocab()` key: 'Ġthe', '▁the', '<0x0A>', '<|im_end|>') is the
    same string; no byte canonicalisation, so a byte-level BPE 'Ġthe' and a SentencePiece '▁the'
    do not match (our VocabMap maps them, by bytes)."""

    teacher_to_student: np.ndarray  # (V_teacher,) student id with the same string, -1 = none
    student_matched: np.ndarray  # (V_student,) bool: the image of some teacher token
    matched_share: float  # matched teacher tokens / teacher vocabulary: GOLD's adaptive matched weight

    @classmethod
    def of(cls, teacher_tokenizer, student_tokenizer) -> ExactVocab:
        teacher, student = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        mapping = np.full(max(teacher.values()) + 1, -1, dtype=np.int64)
        matched = np.zeros(max(student.values()) + 1, dtype=bool)
        for token, teacher_id in teacher.items():
            if token in student:
                mapping[teacher_id] = student[token]
                matched[student[token]] = True
        return cls(mapping, matched, float((mapping >= 0).sum()) / len(mapping))

    def map_ids(self, teacher_ids: np.ndarray) -> np.ndarray:
        return _lookup(self.teacher_to_student, teacher_ids)


def _lookup(mapping: np.ndarray, teacher_ids) -> np.ndarray:
    ids = np.asarray(teacher_ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(mapping))
    return np.where(inside, mapping[np.clip(ids, 0, len(mapping) - 1)], -1)


@dataclass
class CrossVocab:
    """What training and evaluation know about a (teacher, student) pair of tokenizers."""

    teacher_tokenizer: object
    student_tokenizer: object
    teacher_vocab: VocabMap
    student_vocab: VocabMap
    mapping: np.ndarray  # (V_teacher,) student id per teacher id, -1 = unmapped
    exact: ExactVocab | None = None  # GOLD's exact-string match (the `gold` term)

    @classmethod
    def build(cls, teacher_tokenizer, student_tokenizer, cache_dir: Path) -> CrossVocab:
        return cls(teacher_tokenizer, student_tokenizer, VocabMap(teacher_tokenizer), VocabMap(student_tokenizer),
                   cached_vocab_map(teacher_tokenizer, student_tokenizer, cache_dir),
                   ExactVocab.of(teacher_tokenizer, student_tokenizer))

    def map_ids(self, teacher_ids: np.ndarray) -> np.ndarray:
        return _lookup(self.mapping, teacher_ids)

    def teacher_text(self, teacher_answer_ids) -> bytes:
        """The answer's bytes that form valid UTF-8 (what the student is given to tokenize)."""
        return b"".join(b for b in valid_utf8(token_bytes(teacher_answer_ids, self.teacher_vocab))[0] if b is not None)


@dataclass
class XTokExample(Example):
    """A student-tokenized example with its targets aligned from the teacher's tokens. Answer
    positions count student answer tokens from 0; `topk_*` of Example stay None."""

    lang: str = ""
    teacher_prompt_ids: np.ndarray | None = None  # what a live teacher scores (online / on-policy)
    teacher_answer_ids: np.ndarray | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (M,) 1:1 answer positions
    mapped_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.int64))  # (M, k), -1 unmapped
    mapped_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))  # (M, k)
    mapped_tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (M,)
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (G,) first position of each group
    start_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))  # (G, k)
    # For `gold`, per group start: the student id of each teacher entry by exact string (-1 none),
    # the teacher's summed log-prob of the group's later tokens (0 at 1:1; NaN where one is outside
    # its top-k or the group runs past max_seq_len), and where the group ends in student tokens.
    start_exact_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.int64))  # (G, k)
    start_teacher_factor: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (G,)
    start_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (G,)
    exact: ExactVocab | None = None  # the pair's (shared, not copied)
    chunks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (C, 2) [s0, s1) of n:m groups
    chunk_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (C,) teacher's
    # Coverage of the whole answer, before truncation to max_seq_len.
    answer_bytes: int = 0
    one_to_one_bytes: int = 0
    topk_mass: float = 0.0  # teacher top-k mass at 1:1 positions
    mapped_mass: float = 0.0  # of which on ids that map


def chosen_logprobs(answer_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """(T,) the teacher's log-prob of the token it wrote, NaN where that token is outside its top-k."""
    hit = topk_ids == np.asarray(answer_ids)[:, None]
    chosen = np.where(hit, topk_logprobs.astype(np.float64), -np.inf).max(-1)
    return np.where(hit.any(-1), chosen, np.nan)


def build_example(pair: CrossVocab, teacher_answer_ids, topk_ids, topk_logprobs, tail_logprobs,
                  student_prompt_ids: list[int], student_answer_ids: list[int], max_seq_len: int,
                  lang: str = "", teacher_prompt_ids=None) -> XTokExample | None:
    """The student's example and the teacher's targets aligned onto it (None when no answer
    token fits in max_seq_len). Without `topk_ids` (a text-only answer) it carries no targets."""
    ids = np.array(list(student_prompt_ids) + list(student_answer_ids), dtype=np.int64)[:max_seq_len]
    n_prompt = len(student_prompt_ids)
    kept = len(ids) - n_prompt
    if kept <= 0:
        return None
    example = XTokExample(ids, n_prompt, None, None, None, lang=lang,
                          teacher_prompt_ids=None if teacher_prompt_ids is None else np.asarray(teacher_prompt_ids),
                          teacher_answer_ids=None if teacher_answer_ids is None else np.asarray(teacher_answer_ids))
    if teacher_answer_ids is None or topk_ids is None:
        return example
    teacher_ids = np.asarray(teacher_answer_ids)
    raw = token_bytes(teacher_ids, pair.teacher_vocab)
    teacher, teacher_damaged = valid_utf8(raw)
    text = b"".join(b for b in teacher if b is not None)
    student, student_damaged = valid_utf8(strip_dummy_prefix(token_bytes(student_answer_ids, pair.student_vocab), text))
    alignment = align_tokens(teacher, student)
    topk_lp = np.asarray(topk_logprobs, dtype=np.float32)
    mapped_all = pair.map_ids(topk_ids)
    chosen = chosen_logprobs(teacher_ids, np.asarray(topk_ids), topk_lp)
    rows, starts, chunks, chunk_lp = [], [], [], []
    example.answer_bytes = sum(len(b) for b in raw if b is not None)  # stray bytes included
    for g in alignment.groups:
        if any(teacher_damaged[g.t0:g.t1]) or any(student_damaged[g.s0:g.s1]):
            continue  # stray bytes: the two sides do not spell the same thing here
        if g.one_to_one:
            example.one_to_one_bytes += g.n_bytes
            probs = np.exp(topk_lp[g.t0].astype(np.float64))
            example.topk_mass += float(probs.sum())
            example.mapped_mass += float(probs[mapped_all[g.t0] >= 0].sum())
            if g.s0 < kept:
                rows.append((g.s0, g.t0))
        else:
            lp = chosen[g.t0:g.t1].sum()
            if g.s1 <= kept and np.isfinite(lp):
                chunks.append((g.s0, g.s1))
                chunk_lp.append(lp)
        if g.s0 < kept:
            starts.append((g.s0, g.t0, g.s1, chosen[g.t0 + 1:g.t1].sum() if g.s1 <= kept else np.nan))
    k = topk_lp.shape[1]
    if rows:
        student_rows, teacher_rows = map(np.array, zip(*rows))
        example.rows, example.mapped_ids = student_rows, mapped_all[teacher_rows]
        example.mapped_logprobs = topk_lp[teacher_rows]
        example.mapped_tail = np.asarray(tail_logprobs, dtype=np.float32)[teacher_rows]
    if starts:
        student_rows, teacher_rows, ends, factors = map(np.array, zip(*starts))
        example.starts, example.start_logprobs = student_rows, topk_lp[teacher_rows]
        example.start_ends, example.start_teacher_factor = ends, factors.astype(np.float32)
        if pair.exact is not None:
            example.start_exact_ids, example.exact = pair.exact.map_ids(np.asarray(topk_ids)[teacher_rows]), pair.exact
    else:
        example.start_logprobs = np.zeros((0, k), np.float32)
    if chunks:
        example.chunks, example.chunk_logprobs = np.array(chunks), np.array(chunk_lp, dtype=np.float32)
    return example


def student_answer_ids(pair: CrossVocab, text: bytes, finished: bool) -> list[int]:
    """The student's tokens of the teacher's answer bytes (valid UTF-8: `CrossVocab.teacher_text`),
    with the student's end of turn when the teacher ended its turn."""
    tokenizer = pair.student_tokenizer
    ids = tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
    if finished and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def example_of(pair: CrossVocab, sample: Sample, max_seq_len: int) -> XTokExample | None:
    """A distill-set sample for the student: prompt through the student's chat template, the
    teacher's answer bytes through its tokenizer, the cached top-k aligned onto them."""
    prompt = encode_prompts(pair.student_tokenizer, [sample.prompt_messages])[0]
    answer = student_answer_ids(pair, pair.teacher_text(sample.answer_ids), sample.finished)
    return build_example(pair, sample.answer_ids, sample.topk_ids, sample.topk_logprobs, sample.tail_logprobs,
                         prompt, answer, max_seq_len, sample.lang, sample.prompt_ids)


def coverage(examples: list[XTokExample]) -> dict[str, float]:
    """xtok_byte_coverage: share of answer bytes in 1:1 groups; xtok_mass_coverage: share of the
    teacher's top-k mass at 1:1 positions on ids that map to student ids; each overall and per
    language (`_ja`, `_en`, ...). Samples without teacher log-probs are left out."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for e in examples:
        if e.teacher_answer_ids is None or not e.answer_bytes:
            continue
        for key in ("", f"_{e.lang}"):
            t = totals[key]
            t[0] += e.one_to_one_bytes
            t[1] += e.answer_bytes
            t[2] += e.mapped_mass
            t[3] += e.topk_mass
    out = {}
    for key, (one_to_one, answer, mapped, mass) in totals.items():
        out[f"xtok_byte_coverage{key}"] = one_to_one / answer if answer else 0.0
        out[f"xtok_mass_coverage{key}"] = mapped / mass if mass else 0.0
    return out


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class XTokBatch(Batch):
    """A student batch (Batch's fields; its topk_* None) with the aligned targets, rows as indices
    into the N answer rows of the batch."""

    rows: torch.Tensor | None = None  # (M,)
    mapped_ids: torch.Tensor | None = None  # (M, k)
    mapped_logprobs: torch.Tensor | None = None  # (M, k)
    mapped_tail: torch.Tensor | None = None  # (M,)
    starts: torch.Tensor | None = None  # (G,)
    start_logprobs: torch.Tensor | None = None  # (G, k)
    chunk_rows: torch.Tensor | None = None  # (L,) answer rows inside the n:m chunks
    chunk_of: torch.Tensor | None = None  # (L,) which chunk each of them belongs to
    chunk_logprobs: torch.Tensor | None = None  # (C,)
    start_exact_ids: torch.Tensor | None = None  # (G, k) gold: student id by exact string, -1 none
    start_teacher_factor: torch.Tensor | None = None  # (G,) gold: teacher's log-prob of the later tokens
    start_example: torch.Tensor | None = None  # (G,) gold: which example each start belongs to
    start_factor_rows: torch.Tensor | None = None  # (L,) gold: answer rows of the groups' later tokens
    start_factor_of: torch.Tensor | None = None  # (L,) gold: which start each of them belongs to
    exact_student_matched: torch.Tensor | None = None  # (V_s,) bool, None without the pair's ExactVocab
    exact_matched_share: torch.Tensor | None = None  # () GOLD's adaptive matched weight

    def to(self, device) -> XTokBatch:
        return XTokBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                            for f in fields(self)})


def collate_xtok(examples: list[XTokExample], pad_id: int) -> XTokBatch:
    """collate() of the student's tokens plus each example's targets, offset to the batch's rows."""
    base = collate(examples, pad_id)
    offset, chunk_offset, start_offset = 0, 0, 0
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    k = max((e.mapped_logprobs.shape[1] for e in examples if len(e.rows)), default=1)
    k_start = max((e.start_logprobs.shape[1] for e in examples if len(e.starts)), default=1)
    for i, e in enumerate(examples):
        parts["rows"].append(e.rows + offset)
        parts["mapped_ids"].append(e.mapped_ids.reshape(-1, k) if len(e.rows) else np.zeros((0, k), np.int64))
        parts["mapped_logprobs"].append(e.mapped_logprobs.reshape(-1, k).astype(np.float32) if len(e.rows)
                                        else np.zeros((0, k), np.float32))
        parts["mapped_tail"].append(e.mapped_tail.astype(np.float32))
        parts["starts"].append(e.starts + offset)
        parts["start_logprobs"].append(e.start_logprobs.reshape(-1, k_start).astype(np.float32) if len(e.starts)
                                       else np.zeros((0, k_start), np.float32))
        for c, (s0, s1) in enumerate(e.chunks):
            parts["chunk_rows"].append(np.arange(s0, s1) + offset)
            parts["chunk_of"].append(np.full(s1 - s0, chunk_offset + c))
        parts["chunk_logprobs"].append(e.chunk_logprobs.astype(np.float32))
        parts["start_exact_ids"].append(e.start_exact_ids.reshape(-1, k_start) if len(e.start_exact_ids)
                                        else np.full((len(e.starts), k_start), -1, np.int64))
        parts["start_teacher_factor"].append(e.start_teacher_factor.astype(np.float32) if len(e.start_teacher_factor)
                                             else np.full(len(e.starts), np.nan, np.float32))
        parts["start_example"].append(np.full(len(e.starts), i, np.int64))
        n_answer = len(e.input_ids) - e.n_prompt
        for g, (s0, s1) in enumerate(zip(e.starts, e.start_ends)):
            later = np.arange(s0 + 1, min(s1, n_answer))  # (a group cut by max_seq_len has a NaN factor)
            parts["start_factor_rows"].append(later + offset)
            parts["start_factor_of"].append(np.full(len(later), start_offset + g))
        start_offset += len(e.starts)
        chunk_offset += len(e.chunks)
        offset += len(e.input_ids) - e.n_prompt
    tensors = {name: torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
               for name, arrays in parts.items()}
    for name in ("chunk_rows", "chunk_of", "start_factor_rows", "start_factor_of"):
        tensors.setdefault(name, torch.zeros(0, dtype=torch.long))
    exact = next((e.exact for e in examples if e.exact is not None), None)
    if exact is not None:
        tensors["exact_student_matched"] = torch.from_numpy(exact.student_matched)
        tensors["exact_matched_share"] = torch.tensor(exact.matched_share, dtype=torch.float32)
    return XTokBatch(**{f.name: getattr(base, f.name) for f in fields(Batch)},
                     **{name: t.long() if t.dtype in (torch.int32, torch.int64) else t for name, t in tensors.items()})


def live_batch(pair: CrossVocab, examples: list[XTokExample], teacher, top_k: int, pad_id: int,
               sampled: Batch | None = None) -> XTokBatch:
    """Targets from the teacher in memory: its top-k + tail on its own tokens of each example's
    text (online), or of the student's sampled answers re-tokenized for it (on-policy, `sampled`
    the student batch of on_policy_batch), aligned back by bytes."""
    from edgedistill.models.hf import score_sequences

    rebuilt = []
    for row, e in enumerate(examples):
        if sampled is None:
            student_answer = e.input_ids[e.n_prompt:].tolist()
            teacher_answer = e.teacher_answer_ids.tolist()
        else:
            ids = sampled.input_ids[row][sampled.attention_mask[row].bool()].tolist()
            student_answer = ids[e.n_prompt:]
            ended = bool(student_answer) and student_answer[-1] == pair.student_tokenizer.eos_token_id
            text = b"".join(b for b in valid_utf8(token_bytes(student_answer, pair.student_vocab))[0] if b is not None)
            teacher_answer = pair.teacher_tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
            if ended and pair.teacher_tokenizer.eos_token_id is not None:
                teacher_answer.append(pair.teacher_tokenizer.eos_token_id)
        rebuilt.append((e, student_answer, teacher_answer))
    scored = score_sequences(teacher, pair.teacher_tokenizer,
                             [(e.teacher_prompt_ids.tolist(), t) for e, _, t in rebuilt], top_k)
    out = []
    for (e, student_answer, teacher_answer), c in zip(rebuilt, scored):
        example = build_example(pair, teacher_answer, c.topk_ids, c.topk_logprobs, c.tail_logprobs,
                                e.input_ids[:e.n_prompt].tolist(), student_answer, len(e.input_ids[:e.n_prompt])
                                + len(student_answer), e.lang, e.teacher_prompt_ids)
        out.append(example)
    return collate_xtok(out, pad_id)


# ---- the loss --------------------------------------------------------------------------------------
def xtok_losses(logprobs: torch.Tensor, batch: XTokBatch, objective: Objective, alm_temperature: float = 1.0,
                terms: tuple[str, ...] = XTOK_LOSSES, gold_matched_weight: float | None = None
                ) -> dict[str, torch.Tensor]:
    """The cross-tokenizer `terms` of one batch (those it has rows or chunks for) from the
    student's (N, V) answer-row log-probs. `gold` weighs its matched part by gold_matched_weight
    and its unmatched part by 1 - that; None is GOLD's adaptive weight (the share of teacher
    tokens with an exact-string match); its JSD takes objective.beta (train.beta)."""
    out = {}
    if "mapped_kl" in terms and len(batch.rows):
        out["mapped_kl"] = mapped_kd(logprobs[batch.rows], batch.mapped_ids, batch.mapped_logprobs,
                                     batch.mapped_tail, objective)
    if "alm" in terms and len(batch.chunk_logprobs):
        token_lp = logprobs.gather(-1, batch.labels[:, None]).squeeze(-1)  # (N,)
        chunk_lp = token_lp.new_zeros(len(batch.chunk_logprobs)).index_add(0, batch.chunk_of, token_lp[batch.chunk_rows])
        out["alm"] = alm_chunk_loss(chunk_lp, batch.chunk_logprobs, alm_temperature)
    if "uld" in terms and len(batch.starts):
        out["uld"] = uld_sorted_l1(logprobs[batch.starts], batch.start_logprobs)
    if "gold" in terms and batch.exact_student_matched is not None:
        keep = torch.isfinite(batch.start_teacher_factor)
        if keep.any():
            out["gold"] = _gold_term(logprobs, batch, keep, objective.beta, gold_matched_weight)
    return out


def _gold_term(logprobs: torch.Tensor, batch: XTokBatch, keep: torch.Tensor, beta: float,
               matched_weight: float | None) -> torch.Tensor:
    """gold_hybrid_loss at the group starts whose merge factors are known (`keep`): the student's
    factor is the sum of its log-probs of each group's later tokens, each clamped at log 1e-8 as
    GOLD clamps the probabilities it multiplies."""
    token_lp = logprobs.gather(-1, batch.labels[:, None]).squeeze(-1).clamp(min=math.log(1e-8))  # (N,)
    factor = token_lp.new_zeros(len(batch.starts)).index_add(0, batch.start_factor_of, token_lp[batch.start_factor_rows])
    w = float(batch.exact_matched_share) if matched_weight is None else matched_weight
    teacher = batch.start_logprobs[keep] + batch.start_teacher_factor[keep, None]
    return gold_hybrid_loss(logprobs[batch.starts[keep]], factor[keep], batch.start_exact_ids[keep], teacher,
                            batch.exact_student_matched, batch.start_example[keep], w, 1.0 - w, beta)


def xtok_step_loss(model, batch: XTokBatch, cfg, head=None) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha_ce·CE(teacher's text in student tokens) + (1 - alpha_ce)·Σ_w w·term, a mean over
    answer tokens for CE and over each term's own rows or chunks. The (N, V) logits are
    materialised here (not fused): N is one batch's answer tokens."""
    hidden = answer_hidden(model, batch)  # (N, H)
    logits = (head or model.get_output_embeddings())(hidden).float()  # (N, V)
    labels = batch.labels.to(logits.device)
    logprobs = torch.log_softmax(logits, dim=-1)
    ce = -logprobs.gather(-1, labels[:, None]).mean()  # cross-entropy, from the same (N, V) pass
    objective = Objective(cfg.objective, cfg.beta, cfg.skew_alpha, 1.0)
    weights = {name: w for name, w in cfg.xtok_weights.items() if w > 0}
    terms = xtok_losses(logprobs, batch, objective, cfg.xtok_alm_temperature, tuple(weights),
                        cfg.xtok_gold_matched_weight)
    kd = sum((weights[name] * value for name, value in terms.items()), ce.new_zeros(()))
    loss = cfg.alpha_ce * ce + (1 - cfg.alpha_ce) * kd
    parts = {"ce": ce.item(), "kd": kd.item()}
    parts |= {f"xtok_{name}": terms[name].item() if name in terms else 0.0 for name in weights}
    return loss, parts


# ---- held-out measures (the evaluate stage and bench/xtok.py) ------------------------------------
@torch.inference_mode()
def teacher_forced_xtok(model, examples: list[XTokExample], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """On the teacher's held-out answers in the student's tokens: perplexity per student token,
    bits per byte of answer text (comparable across tokenizers: nats of every answer token,
    end of turn included, over the answer's UTF-8 bytes), and at 1:1 positions the forward KL
    on the mapped support + rest and the top-1 agreement (the student's argmax is the mapped
    teacher top-1)."""
    nll = kl = 0.0
    tokens = rows = agree = 0
    n_bytes = sum(e.answer_bytes for e in examples)
    for start in range(0, len(examples), batch_size):
        batch = collate_xtok(examples[start:start + batch_size], pad_id)
        logits = (model.get_output_embeddings())(answer_hidden(model, batch)).float()
        logprobs = torch.log_softmax(logits, -1)
        nll -= float(logprobs.gather(-1, batch.labels[:, None]).sum())
        tokens += len(batch.labels)
        if len(batch.rows):
            kl += float(mapped_kd(logprobs[batch.rows], batch.mapped_ids, batch.mapped_logprobs,
                                  batch.mapped_tail)) * len(batch.rows)
            best = batch.mapped_logprobs.argmax(-1, keepdim=True)
            teacher_top = batch.mapped_ids.gather(-1, best).squeeze(-1)
            agree += int((logprobs[batch.rows].argmax(-1) == teacher_top).sum())
            rows += len(batch.rows)
    out = {"answer_tokens": tokens, "one_to_one_positions": rows}
    if tokens and n_bytes:
        out |= {"perplexity": float(np.exp(nll / tokens)), "bits_per_byte": nll / np.log(2) / n_bytes}
    if rows:  # (a measure with nothing to measure is left out, not NaN: the ledger stores no NaN)
        out |= {"top1_agreement": agree / rows, "kl_one_to_one": kl / rows}
    return out

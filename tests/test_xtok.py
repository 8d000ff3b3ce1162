"""Cross-tokenizer distillation: the byte alignment and the vocabulary map on hand-worked English
and Japanese examples with the two tiny tokenizers (byte-level BPE, SentencePiece with byte
fallback), each cross-vocabulary loss against a value computed by hand, the same-vocabulary
path unchanged, and a real `run` whose student speaks another vocabulary."""

from __future__ import annotations

import codecs
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, build_tiny_spm_tokenizer, build_tiny_tokenizer

from edgedistill.distill.losses import (
    alm_chunk_loss,
    gold_hybrid_loss,
    kd_sparse,
    mapped_kd,
    uld_sorted_l1,
)
from edgedistill.models.align import (
    Group,
    align_tokens,
    strip_dummy_prefix,
    token_bytes,
    vocab_map,
)
from edgedistill.models.vocab import VocabMap


@pytest.fixture(scope="module")
def bpe():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def spm():
    return build_tiny_spm_tokenizer()


def pieces(tokenizer, text: str, vocab: VocabMap, eos: bool = True) -> list[bytes | None]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    return strip_dummy_prefix(token_bytes(ids, vocab), text.encode())


# ---- alignment -----------------------------------------------------------------------------------
def test_alignment_by_hand_english_and_japanese():
    """Groups close where both sides end a token at the same byte offset; end of turn pairs with
    end of turn. Worked by hand: 'Write a poem' and '日本' (日 = e6 97 a5, 本 = e6 9c ac)."""
    teacher = [b"W", b"r", b"it", b"e", b" a", b" p", b"o", b"e", b"m", None]
    student = [b"Write", b" a", b" p", b"o", b"em", None]
    assert align_tokens(teacher, student).groups == (
        Group(0, 4, 0, 1, 5), Group(4, 5, 1, 2, 2), Group(5, 6, 2, 3, 2), Group(6, 7, 3, 4, 1),
        Group(7, 9, 4, 5, 2), Group(9, 10, 5, 6, 0))
    # byte-level BPE: 日 whole, 本 split after its second byte; SentencePiece: 日 in byte-fallback pieces, 本 whole
    teacher = [b"\xe6\x97\xa5", b"\xe6\x9c", b"\xac", None]
    student = [b"\xe6", b"\x97", b"\xa5", b"\xe6\x9c\xac", None]
    alignment = align_tokens(teacher, student)
    assert alignment.groups == (Group(0, 1, 0, 3, 3), Group(1, 3, 3, 4, 3), Group(3, 4, 4, 5, 0))
    assert [g.one_to_one for g in alignment.groups] == [False, False, True]
    # n:m — neither side's boundary inside 'abc' is shared
    assert align_tokens([b"ab", b"c"], [b"a", b"bc"]).groups == (Group(0, 2, 0, 2, 3),)


def test_alignment_stops_where_the_bytes_disagree():
    """A character cut by the length limit (or a rewritten text) ends the alignment there."""
    alignment = align_tokens([b"ab", b"c", b"\xe6\x97"], [b"ab", b"c"])
    assert alignment.groups == (Group(0, 1, 0, 1, 2), Group(1, 2, 1, 2, 1))
    assert (alignment.teacher_end, alignment.student_end) == (2, 2)
    assert align_tokens([b"ab"], [b"ax"]).groups == ()


def test_stray_bytes_spell_nothing_and_mark_their_tokens():
    """A stray continuation byte (0x97 alone) and a character cut at the end (e6 97) are no text:
    they are dropped from their tokens, which are marked; the clean tokens keep their bytes."""
    from edgedistill.models.align import valid_utf8

    kept, damaged = valid_utf8([b"a\x97", b"\xe6\x97\xa5", b" b", b"\xe6\x97", None])
    assert kept == [b"a", b"\xe6\x97\xa5", b" b", b"", None]
    assert damaged == [True, False, False, True, False]
    # an empty token joins the group of the bytes after it
    assert align_tokens([b"", b"ab"], [b"ab"]).groups == (Group(0, 2, 0, 1, 2),)


def test_the_tiny_tokenizers_split_as_worked_by_hand(bpe, spm):
    """The real tokenizers give the token bytes the hand-worked cases assume (byte-level `Ġ`,
    SentencePiece `▁` with its dummy prefix dropped, `<0xNN>` byte-fallback pieces)."""
    t, s = VocabMap(bpe), VocabMap(spm)
    assert pieces(bpe, "Write a poem", t) == [b"W", b"r", b"it", b"e", b" a", b" p", b"o", b"e", b"m", None]
    assert pieces(spm, "Write a poem", s) == [b"Write", b" a", b" p", b"o", b"em", None]
    assert pieces(bpe, "猫が好き", t) == [b"\xe7", b"\x8c", b"\xab", "が".encode(), b"\xe5", b"\xa5", b"\xbd",
                                       "き".encode(), None]
    # '▁' alone (the dummy prefix) spells no answer byte; 猫 and 好 come as byte-fallback pieces
    assert pieces(spm, "猫が好き", s) == [b"", b"\xe7", b"\x8c", b"\xab", "が".encode(), b"\xe5", b"\xa5", b"\xbd",
                                       "き".encode(), None]
    groups = align_tokens(pieces(bpe, "猫が好き", t), pieces(spm, "猫が好き", s)).groups
    # the empty '▁' joins the first byte's group (1:2); every other byte or character is 1:1
    assert [(g.t1 - g.t0, g.s1 - g.s0, g.n_bytes) for g in groups] == [
        (1, 2, 1), (1, 1, 1), (1, 1, 1), (1, 1, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 3), (1, 1, 0)]
    groups = align_tokens(pieces(bpe, "The sea is blue.", t), pieces(spm, "The sea is blue.", s)).groups
    one_to_one = sum(g.n_bytes for g in groups if g.one_to_one)
    assert one_to_one == 8  # e, a, ' b', l, u, e, '.': 1+1+2+1+1+1+1 of 16 bytes (Th, ' se', ' is' are 2:1)


def test_vocab_map_by_canonical_bytes(bpe, spm):
    t, s = VocabMap(bpe), VocabMap(spm)
    mapping = vocab_map(t, s, bpe.eos_token_id, spm.eos_token_id)
    assert len(mapping) == len(bpe)
    ids = bpe.convert_tokens_to_ids
    assert mapping[ids("Ġa")] == spm.convert_tokens_to_ids("▁a")  # ' a' in both layouts
    assert mapping[ids("é")] == spm.convert_tokens_to_ids("<0xE9>")  # one byte: a byte-fallback piece
    assert mapping[bpe.eos_token_id] == spm.eos_token_id  # <|im_end|> -> </s>
    assert mapping[ids("<|im_start|>")] == -1  # no special token of that text in the student
    mapped = mapping[mapping >= 0]
    assert len(set(mapped.tolist())) == len(mapped)  # a student id stands for one teacher id
    for teacher_id, student_id in enumerate(mapping):  # every pair spells the same bytes
        if student_id >= 0 and teacher_id != bpe.eos_token_id:
            assert t.id_bytes[teacher_id] == s.id_bytes[int(student_id)]


def test_vocab_map_prefers_a_piece_to_a_byte_fallback_of_the_same_byte(bpe):
    """Gemma's layout: '<0x2E>' has a lower id than '.'; the tokenizer writes '.', so '.' is the
    student id of the teacher's '.' (the model gives <0x2E> ~e^-47: measured, bench/xtok.py)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = {"<unk>": 0, "</s>": 1, "<0x2E>": 2, "<0x61>": 3, "\u2581a": 4, ".": 5}
    student = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(pieces, unk_token="<unk>")),
                                      unk_token="<unk>", eos_token="</s>")
    s = VocabMap(student)
    assert s.byte_fallback_ids == {2, 3} and s.id_bytes[2] == s.id_bytes[5] == b"."
    mapping = vocab_map(VocabMap(bpe), s, bpe.eos_token_id, student.eos_token_id)
    ids = bpe.convert_tokens_to_ids
    assert mapping[ids(".")] == 5 and mapping[ids("a")] == 3 and mapping[ids("Ġa")] == 4


# ---- losses ----------------------------------------------------------------------------------------
Q = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()  # the student's distribution over 4 ids


def test_mapped_kl_golden_value():
    """Teacher: id→0 with p 0.6 (maps to student 0), an unmapped entry with 0.3, tail 0.1. Buckets
    [student 0, rest]: teacher [0.6, 0.4], student [0.5, 0.5]:
    0.6 ln(0.6/0.5) + 0.4 ln(0.4/0.5) = 0.0201359."""
    loss = mapped_kd(Q, torch.tensor([[0, -1]]), torch.tensor([[0.6, 0.3]]).log(), torch.tensor([0.1]).log())
    assert float(loss) == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5), abs=1e-6)
    assert float(loss) == pytest.approx(0.0201359, abs=1e-6)


def test_mapped_kl_is_kd_sparse_when_every_id_maps_to_itself():
    """Same vocabulary, identity map: nothing moves to the rest bucket, and the loss is kd_sparse's."""
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 20), torch.randn(6, 20) * 2
    lp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = lp.topk(5, -1)
    tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    got = mapped_kd(torch.log_softmax(student, -1), top_ids, top_lp, tail)
    assert float(got) == pytest.approx(float(kd_sparse(student, top_ids, top_lp, tail)), abs=1e-6)


def test_mapped_kl_zero_when_equal_and_finite_gradient_without_any_mapped_id():
    lp = Q.clone().requires_grad_()
    assert float(mapped_kd(Q, torch.tensor([[1, 0]]), Q[:, [1, 0]], torch.log(torch.tensor([0.25])))) \
        == pytest.approx(0.0, abs=1e-6)
    loss = mapped_kd(lp, torch.tensor([[-1, -1]]), torch.tensor([[0.6, 0.3]]).log(), torch.tensor([0.1]).log())
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and torch.isfinite(lp.grad).all()


def test_alm_golden_value_and_zero_for_equal_chunks():
    """KL(Bern(0.5) ‖ Bern(0.25)) = 0.5 ln 2 + 0.5 ln(2/3) = 0.1438410; τ = 2 compares
    Bern(0.5^½) with Bern(0.25^½) = Bern(0.5)."""
    got = alm_chunk_loss(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]))
    assert float(got) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    a, b = math.sqrt(0.5), 0.5
    softened = alm_chunk_loss(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]), temperature=2.0)
    assert float(softened) == pytest.approx(a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)), abs=1e-6)
    chunks = torch.tensor([-0.3, -2.0, -7.5])
    assert float(alm_chunk_loss(chunks, chunks)) == pytest.approx(0.0, abs=1e-7)
    assert float(alm_chunk_loss(torch.zeros(0), torch.zeros(0))) == 0.0


def test_uld_golden_value():
    """Teacher top-2 {0.3, 0.6} sorted [0.6, 0.3] against the student's two largest [0.5, 0.25]:
    |0.1| + |0.05| = 0.15, whichever ids they are."""
    assert float(uld_sorted_l1(Q, torch.tensor([[0.3, 0.6]]).log())) == pytest.approx(0.15, abs=1e-6)
    assert float(uld_sorted_l1(Q, Q[:, [2, 0, 1]])) == pytest.approx(0.0, abs=1e-6)


def _jsd_term(p: float, q: float, beta: float = 0.5) -> float:
    m = beta * p + (1 - beta) * q
    return beta * p * math.log(p / m) + (1 - beta) * q * math.log(q / m)


def test_gold_golden_value():
    """Student Q; student ids 0, 1, 2 are exact-string images of teacher tokens, 3 is not.
    A (a 1:1 group): teacher top-3 0.6 → student 0, 0.2 → student 1, 0.15 unmatched (tail 0.05):
      matched JSD(½) of (0.6, 0.5) and (0.2, 0.25) = 0.0036676; unmatched [0.15] against the
      student's largest unmatched [0.125]: 0.025; 0.6·0.0036676 + 0.4·0.025 = 0.0122006.
    B (a merged group): teacher ×0.8 = [0.48, 0.16, 0.12] with only the first matched (→ 0), the
      student ×0.5 = [0.25, 0.125, 0.0625, 0.0625]: JSD(0.48, 0.25) = 0.0184287; unmatched
      [0.16, 0.12] against [0.0625, 0] (one unmatched student id: zero-padded as GOLD pads):
      0.2175; 0.6·0.0184287 + 0.4·0.2175 = 0.0980572.
    Sequences [A] and [B, A]: GOLD's per-sequence mean, then the mean: (A + (B + A)/2)/2."""
    matched = torch.tensor([True, True, True, False])
    teacher = torch.tensor([[0.6, 0.2, 0.15]]).log()
    a = gold_hybrid_loss(Q, torch.zeros(1), torch.tensor([[0, 1, -1]]), teacher, matched,
                         torch.zeros(1, dtype=torch.long), 0.6, 0.4)
    jsd_a = _jsd_term(0.6, 0.5) + _jsd_term(0.2, 0.25)
    assert jsd_a == pytest.approx(0.0036676, abs=1e-7)
    assert float(a) == pytest.approx(0.6 * jsd_a + 0.4 * 0.025, abs=1e-7)
    assert float(a) == pytest.approx(0.0122006, abs=1e-6)
    b = gold_hybrid_loss(Q, torch.tensor([math.log(0.5)]), torch.tensor([[0, -1, -1]]), teacher + math.log(0.8),
                         matched, torch.zeros(1, dtype=torch.long), 0.6, 0.4)
    assert float(b) == pytest.approx(0.6 * _jsd_term(0.48, 0.25) + 0.4 * 0.2175, abs=1e-7)
    assert float(b) == pytest.approx(0.0980572, abs=1e-6)
    both = gold_hybrid_loss(Q.repeat(3, 1), torch.tensor([0.0, math.log(0.5), 0.0]),
                            torch.tensor([[0, 1, -1], [0, -1, -1], [0, 1, -1]]),
                            torch.cat([teacher, teacher + math.log(0.8), teacher]), matched,
                            torch.tensor([0, 1, 1]), 0.6, 0.4)
    assert float(both) == pytest.approx((float(a) + (float(b) + float(a)) / 2) / 2, abs=1e-7)
    # β = 0 is forward KL on the matched entries, unnormalised: 0.6 ln(0.6/0.5) + 0.2 ln(0.2/0.25)
    forward = gold_hybrid_loss(Q, torch.zeros(1), torch.tensor([[0, 1, -1]]), teacher, matched,
                               torch.zeros(1, dtype=torch.long), 1.0, 0.0, beta=0.0)
    assert float(forward) == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.2 * math.log(0.2 / 0.25), abs=1e-7)


def _gold_dense_reference(student: torch.Tensor, teacher: torch.Tensor, teacher_to_student: dict[int, int],
                          beta: float, w_matched: float, w_unmatched: float) -> torch.Tensor:
    """GOLD's hybrid loss on one sequence's merged probability rows (G, V_s) and (G, V_t), written
    from its description (distill/xtok.py): JSD(β) on the log-clamped matched columns, sorted L1
    on the zero-padded unmatched columns, each summed and divided by the number of groups."""
    t_ids = sorted(teacher_to_student)
    s_ids = [teacher_to_student[i] for i in t_ids]
    t_lp, s_lp = teacher[:, t_ids].clamp_min(1e-8).log(), student[:, s_ids].clamp_min(1e-8).log()
    mix = torch.logsumexp(torch.stack([s_lp + math.log(1 - beta), t_lp + math.log(beta)]), 0)
    matched = (beta * t_lp.exp() * (t_lp - mix) + (1 - beta) * s_lp.exp() * (s_lp - mix)).sum() / len(student)
    t_rest = teacher[:, [i for i in range(teacher.shape[1]) if i not in t_ids]].sort(-1, descending=True).values
    s_rest = student[:, [i for i in range(student.shape[1]) if i not in s_ids]].sort(-1, descending=True).values
    width = max(t_rest.shape[1], s_rest.shape[1])
    t_rest = torch.nn.functional.pad(t_rest, (0, width - t_rest.shape[1]))
    s_rest = torch.nn.functional.pad(s_rest, (0, width - s_rest.shape[1]))
    unmatched = (t_rest - s_rest).abs().sum() / len(student)
    return w_matched * matched + w_unmatched * unmatched


def test_gold_is_golds_loss_when_the_whole_teacher_is_cached():
    """Teacher top-k = its whole vocabulary (6 ids, shuffled), 3 of them matching student ids by
    string, 3 unmatched on each side, merged rows (factors), adaptive weight 3/6: the value is a
    dense reference of GOLD's hybrid loss, and the gradient is finite."""
    torch.manual_seed(0)
    groups = 4
    teacher = torch.softmax(torch.randn(groups, 6) * 2, -1)
    student_lp = torch.log_softmax(torch.randn(groups, 6), -1).requires_grad_()
    teacher_factor, student_factor = torch.rand(groups).log(), torch.rand(groups).log()
    teacher_to_student = {0: 4, 3: 1, 5: 2}
    order = torch.stack([torch.randperm(6) for _ in range(groups)])
    exact = torch.tensor([[teacher_to_student.get(int(i), -1) for i in row] for row in order])
    student_matched = torch.zeros(6, dtype=torch.bool)
    student_matched[list(teacher_to_student.values())] = True
    merged_teacher = teacher.log() + teacher_factor[:, None]
    got = gold_hybrid_loss(student_lp, student_factor, exact, merged_teacher.gather(-1, order), student_matched,
                           torch.zeros(groups, dtype=torch.long), 0.5, 0.5, beta=0.5)
    expected = _gold_dense_reference((student_lp + student_factor[:, None]).exp(), merged_teacher.exp(),
                                     teacher_to_student, 0.5, 0.5, 0.5)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    got.backward()
    assert torch.isfinite(student_lp.grad).all() and student_lp.grad.abs().sum() > 0


def test_alm_caps_certain_chunks_below_zero():
    """A chunk the teacher (or the student) writes with log-likelihood 0 (p = 1 in float32) is
    capped at -1e-6, so 1 - p stays positive and the binary KL finite; the reference is the
    binary KL in float64 on the capped values."""
    teacher, student = [0.0, -0.5, -2.0], [-1.0, 0.0, 1e-3]  # log-likelihoods; 1e-3 is rounding above 0

    def binary_kl(t: float, s: float) -> float:
        p, q = math.exp(min(t, -1e-6)), math.exp(min(s, -1e-6))
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    expected = sum(binary_kl(t, s) for t, s in zip(teacher, student)) / 3
    got = alm_chunk_loss(torch.tensor(student), torch.tensor(teacher))
    assert math.isfinite(float(got)) and float(got) == pytest.approx(expected, rel=1e-5)


def test_uld_is_a_mean_over_rows():
    """Row 1 is test_uld_golden_value's (0.15), row 2 the student against itself (0): mean 0.075."""
    student = torch.cat([Q, Q.roll(1, -1)])
    got = uld_sorted_l1(student, torch.cat([torch.tensor([[0.3, 0.6]]).log(), Q[:, [1, 0]]]))
    assert float(got) == pytest.approx(0.075, abs=1e-6)


def _gold_loop_reference(student_lp, student_factor, exact, teacher_lp, student_matched, example_of,
                         w_matched: float, w_unmatched: float, beta: float) -> float:
    """GOLD's hybrid loss entry by entry in float64: per row, the generalized JSD(β) terms of the
    matched teacher entries (both probabilities floored at 1e-8; β = 0 forward, β = 1 reverse KL),
    plus Σ_r |t_r - s_r| over the teacher's unmatched entries sorted down against the student's
    probabilities on unmatched ids sorted down (zeros once those run out); then the mean over
    each sequence's rows and the mean over the sequences. -inf teacher entries are absent."""
    per_example: dict[int, list[float]] = {}
    for h in range(len(student_lp)):
        s = [math.exp(float(x) + float(student_factor[h])) for x in student_lp[h]]
        matched, t_unmatched = 0.0, []
        for j in range(teacher_lp.shape[1]):
            if float(teacher_lp[h, j]) == float("-inf"):
                continue
            t = math.exp(float(teacher_lp[h, j]))
            if int(exact[h, j]) < 0:
                t_unmatched.append(t)
                continue
            p, q = max(t, 1e-8), max(s[int(exact[h, j])], 1e-8)
            if beta == 0.0:
                matched += p * math.log(p / q)
            elif beta == 1.0:
                matched += q * math.log(q / p)
            else:
                m = beta * p + (1 - beta) * q
                matched += beta * p * math.log(p / m) + (1 - beta) * q * math.log(q / m)
        free = [s[i] for i in range(len(s)) if not (i < len(student_matched) and bool(student_matched[i]))]
        free = sorted(free, reverse=True) + [0.0] * len(t_unmatched)
        unmatched = sum(abs(t - free[r]) for r, t in enumerate(sorted(t_unmatched, reverse=True)))
        per_example.setdefault(int(example_of[h]), []).append(w_matched * matched + w_unmatched * unmatched)
    means = [sum(rows) / len(rows) for rows in per_example.values()]
    return sum(means) / len(means)


# Four merged groups over a 5-id student vocabulary (ids 0, 1 are exact-string images of teacher
# tokens), the teacher's top-3 with 1, 2, 1 and 0 unmatched entries (-inf: a short top list), two
# sequences (7 and 2) interleaved.
GOLD_CASE = dict(
    student_logprobs=torch.log_softmax(torch.tensor([[1.0, 0.2, -0.5, 0.7, -1.0], [0.1, 0.9, 0.4, -0.3, 0.0],
                                                     [-0.2, 0.3, 1.1, 0.5, -0.6], [0.6, -0.4, 0.2, 0.0, 0.8]]), -1),
    student_log_factor=torch.tensor([0.0, math.log(0.5), math.log(0.8), 0.0]),
    exact_ids=torch.tensor([[0, 1, -1], [-1, 0, -1], [1, -1, -1], [1, 0, -1]]),
    teacher_logprobs=torch.tensor([[0.5, 0.3, 0.1], [0.2, 0.4, 0.35], [0.6, 0.25, 0.0], [0.7, 0.2, 0.0]]).log(),
    student_matched=torch.tensor([True, True, False, False, False]),
    example_of=torch.tensor([7, 7, 2, 7]),
    matched_weight=0.6, unmatched_weight=0.4)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gold_matches_a_loop_reference(beta):
    """β at both ends (forward, reverse KL) and inside; rows whose teacher has fewer unmatched
    entries than the student has unmatched ids, so the sorted L1 must stop at the teacher's count,
    row by row."""
    got = gold_hybrid_loss(**GOLD_CASE, beta=beta)
    assert float(got) == pytest.approx(_gold_loop_reference(*GOLD_CASE.values(), beta), abs=1e-6)


def test_gold_with_a_teacher_list_longer_than_the_student_vocabulary():
    """k = 3 teacher entries, a 2-id student whose `student_matched` is a 0/1 integer tensor
    shorter than its vocabulary (padded with False): the student's sorted side is zero-padded."""
    student_lp = torch.tensor([[0.7, 0.3], [0.4, 0.6]]).log()
    args = (student_lp, torch.zeros(2), torch.tensor([[0, -1, -1], [-1, -1, -1]]),
            torch.tensor([[0.5, 0.3, 0.15], [0.6, 0.3, 0.05]]).log(), torch.tensor([1]), torch.tensor([0, 1]), 0.5, 0.5)
    got = gold_hybrid_loss(*args, beta=0.5)
    # by hand: row 1 JSD(0.5, 0.7) + |0.3 - 0.3| + |0.15 - 0|; row 2 |0.6 - 0.6| + 0.3 + 0.05
    by_hand = (0.5 * (_jsd_term(0.5, 0.7) + 0.15) + 0.5 * 0.35) / 2
    assert float(got) == pytest.approx(by_hand, abs=1e-6)
    assert float(got) == pytest.approx(_gold_loop_reference(*args, 0.5), abs=1e-6)


def test_gold_of_no_groups_is_zero_with_a_gradient():
    student_lp = torch.zeros(0, 5, requires_grad=True)
    loss = gold_hybrid_loss(student_lp, torch.zeros(0), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                            torch.ones(5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), 0.5, 0.5)
    loss.backward()
    assert float(loss) == 0.0 and student_lp.grad.shape == (0, 5)


def test_cross_vocabulary_losses_stay_on_their_inputs_device():
    """Under another default device (here "meta", as `torch.set_default_device("cuda")` would be
    for CPU inputs) the losses build their helper tensors on the inputs' device: same values."""
    expected_gold = float(gold_hybrid_loss(**GOLD_CASE))
    mapped = (Q, torch.tensor([[0, -1]]), torch.tensor([[0.6, 0.3]]).log(), torch.tensor([0.1]).log())
    with torch.device("meta"):
        gold = gold_hybrid_loss(**GOLD_CASE)
        kl = mapped_kd(*mapped)
    assert float(gold) == pytest.approx(expected_gold, abs=1e-7)
    assert float(kl) == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gold_on_cuda_takes_a_cpu_student_matched():
    """The student's rows on the GPU, `student_matched` left on the CPU (a numpy-born mask): the
    loss moves the mask itself and gives the CPU value."""
    expected = float(gold_hybrid_loss(**GOLD_CASE))
    on_gpu = {name: value.cuda() if torch.is_tensor(value) and name != "student_matched" else value
              for name, value in GOLD_CASE.items()}
    assert float(gold_hybrid_loss(**on_gpu)) == pytest.approx(expected, abs=1e-6)


# ---- examples, batches, the same-vocabulary path ---------------------------------------------------
def test_examples_carry_aligned_targets_and_coverage(bpe, spm, tmp_path):
    """A teacher answer 'Write a poem' + end of turn with a made-up top-2 per token: 1:1 rows get
    the teacher's row with ids moved to student ids, n:m groups a chunk with the teacher's
    summed log-probs of its own tokens, and coverage counts bytes and mass at 1:1 tokens."""
    from edgedistill.distill.xtok import (
        CrossVocab,
        build_example,
        collate_xtok,
        coverage,
        student_answer_ids,
    )

    pair = CrossVocab.build(bpe, spm, tmp_path)
    assert len(list(tmp_path.glob("vocab-map-*.npy"))) == 1
    answer = bpe("Write a poem", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    other = bpe.convert_tokens_to_ids("<|im_start|>")  # never maps
    topk_ids = np.array([[a, other] for a in answer])
    topk_lp = np.log(np.array([[0.5, 0.25]] * len(answer), dtype=np.float32))
    tail = np.log(np.full(len(answer), 0.25, dtype=np.float32))
    student = student_answer_ids(pair, pair.teacher_text(answer), finished=True)
    assert student == spm("Write a poem", add_special_tokens=False)["input_ids"] + [spm.eos_token_id]
    e = build_example(pair, answer, topk_ids, topk_lp, tail, [1, 2, 3], student, 512, "en")
    # groups: Write(4:1) ' a' ' p' 'o' (1:1) 'em'(2:1) EOS(1:1)
    assert e.rows.tolist() == [1, 2, 3, 5]
    assert e.mapped_ids[:, 0].tolist() == [spm.convert_tokens_to_ids(t) for t in ("▁a", "▁p", "o")] + [spm.eos_token_id]
    assert (e.mapped_ids[:, 1] == -1).all()
    assert e.chunks.tolist() == [[0, 1], [4, 5]]
    assert e.chunk_logprobs.tolist() == pytest.approx([4 * math.log(0.5), 2 * math.log(0.5)])
    assert e.starts.tolist() == [0, 1, 2, 3, 4, 5]
    assert coverage([e]) == pytest.approx({"xtok_byte_coverage": 5 / 12, "xtok_mass_coverage": 2 / 3,
                                           "xtok_byte_coverage_en": 5 / 12, "xtok_mass_coverage_en": 2 / 3})
    batch = collate_xtok([e, e], pad_id=0)
    n = len(student)
    assert batch.rows.tolist() == [1, 2, 3, 5, n + 1, n + 2, n + 3, n + 5]
    assert batch.chunk_rows.tolist() == [0, 4, n, n + 4] and batch.chunk_of.tolist() == [0, 1, 2, 3]
    assert torch.equal(batch.labels[batch.rows[:4]], torch.tensor(student)[[1, 2, 3, 5]])
    # gold: GOLD's exact-string match ('Ġa' is not '▁a', though they map by bytes), the teacher's
    # factor of each group's later tokens (W|r|it|e: 3 of them at 0.5, e|m: 1)
    assert e.start_exact_ids[:, 0].tolist() == [spm.convert_tokens_to_ids(t) if t else -1
                                                for t in ("W", None, None, "o", "e", None)]
    assert (e.start_exact_ids[:, 1] == -1).all() and e.mapped_ids[0, 0] >= 0
    assert e.start_teacher_factor.tolist() == pytest.approx([3 * math.log(0.5), 0, 0, 0, math.log(0.5), 0])
    assert batch.start_example.tolist() == [0] * 6 + [1] * 6
    vocab = spm.get_vocab()
    assert float(batch.exact_matched_share) == pytest.approx(sum(t in vocab for t in bpe.get_vocab()) / len(bpe))


def test_gold_term_merges_the_students_later_tokens(bpe, spm, tmp_path):
    """Teacher SentencePiece, student byte-level BPE: '▁Write' is the student's Ġ|W|r|it|e, so the
    student's factor of that group is its log-probs of W, r, it, e; xtok_losses' gold is
    gold_hybrid_loss on those rows, and a group cut by max_seq_len is left out."""
    from edgedistill.distill.losses import Objective
    from edgedistill.distill.xtok import (
        CrossVocab,
        build_example,
        collate_xtok,
        student_answer_ids,
        xtok_losses,
    )

    pair = CrossVocab.build(spm, bpe, tmp_path)
    answer = spm("Write a poem", add_special_tokens=False)["input_ids"] + [spm.eos_token_id]
    topk_ids = np.array([[a, spm.convert_tokens_to_ids("o")] for a in answer])
    topk_lp = np.log(np.array([[0.5, 0.25]] * len(answer), dtype=np.float32))
    tail = np.log(np.full(len(answer), 0.25, dtype=np.float32))
    student = student_answer_ids(pair, pair.teacher_text(answer), finished=True)
    assert bpe.convert_ids_to_tokens(student[:5]) == ["Ġ", "W", "r", "it", "e"]
    e = build_example(pair, answer, topk_ids, topk_lp, tail, [1, 2], student, 512, "en")
    assert e.start_ends[0] == 5 and e.start_teacher_factor[0] == 0
    cut = build_example(pair, answer, topk_ids, topk_lp, tail, [1, 2], student, 2 + 2, "en")
    assert cut.starts.tolist() == [0] and np.isnan(cut.start_teacher_factor).all()
    batch = collate_xtok([e, cut], pad_id=0)
    assert batch.start_factor_rows[:4].tolist() == [1, 2, 3, 4] and batch.start_factor_of[:4].tolist() == [0] * 4
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(len(batch.labels), len(bpe)), -1)
    got = xtok_losses(logprobs, batch, Objective("jsd", beta=0.5), terms=("gold",), gold_matched_weight=0.6)["gold"]
    n = len(e.starts)
    factor = torch.zeros(n)
    factor[0] = logprobs[[1, 2, 3, 4], batch.labels[[1, 2, 3, 4]]].sum()
    for g in range(1, n):
        later = range(int(e.starts[g]) + 1, int(e.start_ends[g]))
        factor[g] = sum((logprobs[r, batch.labels[r]] for r in later), torch.tensor(0.0))
    expected = gold_hybrid_loss(logprobs[e.starts], factor, torch.from_numpy(e.start_exact_ids),
                                torch.from_numpy(e.start_logprobs), torch.from_numpy(pair.exact.student_matched),
                                torch.zeros(n, dtype=torch.long), 0.6, 0.4)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)


def test_the_same_vocabulary_step_is_the_fused_loss_bit_for_bit(bpe):
    """Equal vocabularies never reach distill/xtok.py: step_loss is the fused head loss exactly."""
    from edgedistill.distill.batches import Example, answer_hidden, collate
    from edgedistill.distill.fused import SparseTarget, fused_head_loss
    from edgedistill.distill.train import objective_of, step_loss
    from edgedistill.recipe import TrainCfg

    model = build_tiny_model(bpe, layers=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(bpe), size=(2, 12))
    examples = [Example(row, 5, rng.integers(0, len(bpe), size=(7, 4)).astype(np.int32),
                        np.log(np.full((7, 4), 0.2, dtype=np.float16)), np.log(np.full(7, 0.2, dtype=np.float32)))
                for row in ids]
    batch = collate(examples, bpe.pad_token_id)
    cfg = TrainCfg(alpha_ce=0.3)
    loss, parts = step_loss(model, batch, cfg)
    expected, expected_parts = fused_head_loss(
        answer_hidden(model, batch), model.get_output_embeddings(), batch.labels, ce_weight=0.3, kd_weight=0.7,
        objective=objective_of(cfg), target=SparseTarget(batch.topk_ids, batch.topk_logprobs, batch.tail_logprobs))
    assert torch.equal(loss, expected) and parts == expected_parts


# ---- a real run with a student of another vocabulary -------------------------------------------------
def recount(samples, teacher_tok, student_tok) -> tuple[float, float, float, float]:
    """Coverage counted another way than align_tokens' two-pointer walk: the byte offsets where
    both tokenizations end a token cut the text into intervals; an interval is 1:1 when exactly
    one teacher and one student token start in it and neither holds a byte Python's UTF-8
    decoder drops. The end of turn counts when the student spells the whole text and ends its
    turn too. Returns (1:1 bytes, answer bytes, mapped top-k mass, top-k mass) at those tokens."""
    t_vocab, s_vocab = VocabMap(teacher_tok), VocabMap(student_tok)
    ordinary = {raw for i, raw in s_vocab.id_bytes.items() if i not in s_vocab.special_ids}

    def maps(teacher_id: int) -> bool:
        if teacher_id in t_vocab.special_ids:
            return teacher_id == teacher_tok.eos_token_id
        return t_vocab.id_bytes[teacher_id] in ordinary

    dropped: list[int] = []
    codecs.register_error("test-xtok-record", lambda err: (dropped.extend(range(err.start, err.end)), ("", err.end))[1])
    one_to_one = answer = mapped = mass = 0.0
    for sample in samples:
        ids = [int(i) for i in sample.answer_ids]
        text = b"".join(t_vocab.id_bytes[i] for i in ids if i not in t_vocab.special_ids)
        dropped.clear()
        kept = text.decode("utf-8", "test-xtok-record")
        gone = set(dropped)
        teacher, offset, row_of = [], 0, {}  # (kept lo, kept hi, damaged) per ordinary teacher token
        for row, idx in enumerate(ids):
            if idx in t_vocab.special_ids:
                continue
            width = len(t_vocab.id_bytes[idx])
            span = range(offset, offset + width)
            lo = offset - sum(p < offset for p in gone)
            row_of[len(teacher)] = row
            teacher.append((lo, lo + sum(p not in gone for p in span), any(p in gone for p in span)))
            offset += width
        total = len(kept.encode())
        student = student_tok(kept, add_special_tokens=False)["input_ids"]
        spelled = b"".join(s_vocab.id_bytes[i] for i in student)
        prefixed = spelled.startswith(b" ") and not kept.startswith(" ")  # SentencePiece's dummy '▁'
        spans, lo = [], 0
        for k, idx in enumerate(student):
            width = len(s_vocab.id_bytes[idx]) - (1 if k == 0 and prefixed else 0)
            spans.append((lo, lo + width))
            lo += width
        spelled = spelled[1:] if prefixed else spelled
        agree = next((n for n, (a, b) in enumerate(zip(kept.encode(), spelled)) if a != b), min(total, len(spelled)))
        cuts = sorted({0} | ({hi for _, hi, _ in teacher} & {hi for _, hi in spans} & set(range(agree + 1))))
        for a, b in zip(cuts, cuts[1:]):
            inside = [t for t, (lo, _, _) in enumerate(teacher) if a <= lo < b]
            theirs = [s for s, (lo, _) in enumerate(spans) if a <= lo < b]
            if len(inside) == 1 and len(theirs) == 1 and not teacher[inside[0]][2]:
                one_to_one += b - a
                row = row_of[inside[0]]
                probs = np.exp(sample.topk_logprobs[row].astype(np.float64))
                mass += probs.sum()
                mapped += sum(p for i, p in zip(sample.topk_ids[row], probs) if maps(int(i)))
        every_token_placed = all(lo < cuts[-1] for lo, _, _ in teacher) and all(lo < cuts[-1] for lo, _ in spans)
        if sample.finished and spelled == kept.encode() and every_token_placed and ids[-1] in t_vocab.special_ids:
            probs = np.exp(sample.topk_logprobs[len(ids) - 1].astype(np.float64))
            mass += probs.sum()
            mapped += sum(p for i, p in zip(sample.topk_ids[len(ids) - 1], probs) if maps(int(i)))
        answer += len(text)
    return one_to_one, answer, mapped, mass


@pytest.fixture(scope="module")
def other_vocab_run(tiny_teacher_dir, tmp_path_factory):
    """A tiny run through the student stage whose student is a SentencePiece-vocabulary checkpoint."""
    from conftest import tiny_recipe_for

    from edgedistill.pipeline import run_recipe

    root = tmp_path_factory.mktemp("xtok")
    other = root / "spm-student"
    tokenizer = build_tiny_spm_tokenizer()
    build_tiny_model(tokenizer, layers=2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    recipe = tiny_recipe_for(tiny_teacher_dir, root / "runs")
    recipe = recipe.model_copy(update={
        "student": recipe.student.model_copy(update={"init": "checkpoint", "model": str(other)}),
        "train": recipe.train.model_copy(update={"epochs": 1, "xtok_weights": {"mapped_kl": 1.0, "alm": 1.0,
                                                                                "uld": 0.5, "gold": 0.5}}),
        "evaluate": recipe.evaluate.model_copy(update={"judge": False, "tasks": []})})
    for stage in ("generate", "student"):
        run_recipe(recipe, only=stage)
    return recipe


@pytest.mark.parametrize("mode", ["online", "on_policy"])
def test_a_live_teacher_scores_across_vocabularies(other_vocab_run, mode):
    """Online: the teacher in memory scores its own tokens of each answer; on-policy (λ = 1):
    the student's sampled answers, re-tokenized for the teacher; both aligned back by bytes."""
    from edgedistill.pipeline import run_recipe
    from edgedistill.run import RunDir, open_ledger

    recipe = other_vocab_run.model_copy(update={
        "run": other_vocab_run.run.model_copy(update={"name": f"xtok-{mode}"}),
        "train": other_vocab_run.train.model_copy(update={"mode": mode, "on_policy_fraction": 1.0,
                                                          "on_policy_max_new_tokens": 8, "sft_baseline": False})})
    shutil.copytree(RunDir.for_recipe(other_vocab_run).root, RunDir.for_recipe(recipe).root,
                    ignore=shutil.ignore_patterns("student", "checkpoints", "*.jsonl"))
    run = run_recipe(recipe, only="train")
    log = [json.loads(line) for line in (run.root / "train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["loss"]) and "xtok_mapped_kl" in r for r in log)
    assert any(r["kd"] > 0 for r in log)
    if mode == "on_policy":  # λ = 1: every batch answered by the student, divergence only
        assert all(r["on_policy"] == 1.0 and r["loss"] == pytest.approx(r["kd"]) for r in log)
    with open_ledger(run) as ledger:
        assert f"{mode} cross-tokenizer logit KD" in ledger.meta()["kd_mode"]


def test_a_run_with_another_vocabulary_trains_on_the_teachers_logits(other_vocab_run):
    """train → evaluate (and its report) with a student of another vocabulary. The ledger's
    coverage equals an interval recount on the stored answers (`recount`), the training log
    has a KD part, and the report has its section."""
    from edgedistill.data.store import load_distill_set
    from edgedistill.pipeline import run_recipe
    from edgedistill.run import open_ledger

    recipe, tokenizer = other_vocab_run, build_tiny_spm_tokenizer()
    for stage in ("train", "evaluate"):  # evaluate writes the report too
        run = run_recipe(recipe, only=stage)
    with open_ledger(run) as ledger:
        train = ledger.metrics("train")["stage"]
        kd_mode = ledger.meta()["kd_mode"]
        evaluated = ledger.metrics("evaluate")
    assert "cross-tokenizer logit KD" in kd_mode and "vocab_mismatch_fallback" not in train

    one_to_one, answer, mapped, mass = recount(load_distill_set(run, split="train"), build_tiny_tokenizer(), tokenizer)
    assert 0.0 <= train["xtok_byte_coverage"] <= 1.0 and 0.0 <= train["xtok_mass_coverage"] <= 1.0
    assert train["xtok_byte_coverage"] == pytest.approx(one_to_one / answer)
    assert train["xtok_mass_coverage"] == pytest.approx(mapped / mass, rel=1e-5)
    assert 0 < one_to_one < answer and 0 < mapped < mass
    assert {"xtok_byte_coverage_en", "xtok_byte_coverage_ja", "xtok_mass_coverage_ja"} <= train.keys()

    log = [json.loads(line) for line in (run.root / "train_log.jsonl").read_text().splitlines()]
    assert log and all("xtok_mapped_kl" in r and "xtok_alm" in r and "xtok_uld" in r and "xtok_gold" in r
                       for r in log)
    assert any(r["xtok_gold"] > 0 for r in log)
    assert sum(r["kd"] > 0 for r in log) >= len(log) - 1  # (a batch of two random answers may align nowhere)
    sft = [json.loads(line) for line in (run.root / "train_log_sft.jsonl").read_text().splitlines()]
    assert sft and all("kd" not in r for r in sft)
    for row in ("student_after", "student_sft"):  # measured in the student's tokens, per byte
        assert 0 < evaluated[row]["bits_per_byte"] < 50 and "kl_one_to_one" in evaluated[row]
    report = run.report_path.read_text(encoding="utf-8")
    assert "## Cross-tokenizer distillation" in report and "teacher's logits" in report
    html = run.report_html_path.read_text(encoding="utf-8")
    assert "Cross-tokenizer distillation" in html
    shutil.rmtree(run.root / "checkpoints", ignore_errors=True)


def test_xtok_weights_are_validated_in_the_recipe():
    from edgedistill.errors import UserError
    from edgedistill.recipe import build_recipe

    recipe = build_recipe({}, "<t>", ["train.xtok_weights={uld = 1.0, alm = 0.5}"])
    assert recipe.train.xtok_weights == {"uld": 1.0, "alm": 0.5}
    assert build_recipe({}, "<t>", ["train.xtok_weights={gold = 1.0}"]).train.xtok_weights == {"gold": 1.0}
    for bad in ("{alm = -1.0, uld = 1.0}", "{alm = 0.0}", "{}", "{gkd = 1.0}"):
        with pytest.raises(UserError, match="xtok_weights"):
            build_recipe({}, "<t>", [f"train.xtok_weights={bad}"])

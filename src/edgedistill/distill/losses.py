"""Distillation losses as pure functions: tensors in, scalar out, no trainer state.

The family (`Objective.kind`), on log-probability rows p (teacher) and q (student):
- forward_kl  KL(p‖q) — mean-seeking, the classic (Hinton; DistillKit's sparse logits);
- reverse_kl  KL(q‖p) — mode-seeking (MiniLLM);
- jsd         generalized JSD(β) exactly as TRL's GKD defines it: β KL(p‖m) + (1-β) KL(q‖m),
              m = βp + (1-β)q; β = 0 is forward KL, β = 1 reverse KL;
- skew_forward_kl  KL(p ‖ αp + (1-α)q), skew_reverse_kl  KL(q ‖ αq + (1-α)p) (DistiLLM);
  α = 0 gives the plain KLs;
- tvd         total variation ½ Σ|p - q|.
Temperature T softens both sides (log-softmax of logits / T) and the loss is scaled by T².
Every divergence works on dense rows (V columns, computed in row chunks so B·T·V never exists
in float32 at once) and on the sparse target below (k+1 columns).
Why our own rather than TRL's or torchtune's: theirs take dense teacher logits only; the
sparse top-k + tail target, and sampled targets, are what keep the cached teacher small.

Shapes: N answer tokens (batch and time flattened, masked positions already removed or given
by `mask`), V vocabulary, k cached teacher entries. Log-probabilities are natural logs.

Sparse target (ARCHITECTURE.md): the teacher's top-k log-probs plus one "tail" bucket holding
the leftover mass, so the target is a distribution over k+1 buckets; the student is gathered
on the same k ids plus its own tail. Neither side is renormalised over k alone, which would
overstate the teacher's confidence (cf. DistillKit's sparse logits, and Anshumann et al. 2025
on the bias of plain top-k targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from edgedistill.recipe import OBJECTIVES

Kind = Literal[OBJECTIVES]
KINDS: tuple[str, ...] = OBJECTIVES
# Teacher buckets with zero mass (padding of a short top list, unsampled ids) would make the
# student-side divergences infinite; they are floored at 1e-10 in probability.
_LOG_FLOOR = math.log(1e-10)

_LOG_HALF = -math.log(2.0)
# The student's tail is log(1 - mass on the k ids); keep it finite when the k ids hold ~all of
# it (log(1e-7) = -16.1), so its gradient never becomes inf. The bias is at most 1e-7 in mass.
_MAX_TOPK_LOGMASS = math.log1p(-1e-7)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_student_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs on the teacher's k ids plus the student's own tail.

    Args:
        student_logits: (N, V) raw logits.
        topk_ids: (N, k) teacher token ids.
    Returns:
        (N, k+1) log-probs; the last column is log of the mass outside the k ids.
    """
    log_z = student_logits.float().logsumexp(-1, keepdim=True)  # (N, 1)
    return sparse_table(student_logits.float().gather(-1, topk_ids.long()) - log_z)


def sparse_table(top_logprobs: torch.Tensor) -> torch.Tensor:
    """(N, k) log-probs on k ids -> (N, k+1) with the mass outside them as the last column."""
    tail = log1mexp(top_logprobs.logsumexp(-1).clamp(max=_MAX_TOPK_LOGMASS))  # (N,)
    return torch.cat([top_logprobs, tail[:, None]], dim=-1)


def sparse_teacher_logprobs(topk_logprobs: torch.Tensor, tail_logprobs: torch.Tensor) -> torch.Tensor:
    """(N, k) top-k and (N,) tail log-probs -> the (N, k+1) target distribution."""
    return torch.cat([topk_logprobs.float(), tail_logprobs.float()[:, None]], dim=-1)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def kl_from_logprobs(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || student) = sum_i p_i (log p_i - log q_i); rows (N, C) -> (N,).

    Buckets where the teacher has zero mass contribute 0 (not 0 * -inf = nan).
    """
    p = teacher_lp.exp()
    terms = torch.where(p > 0, p * (teacher_lp - student_lp), torch.zeros_like(p))
    return terms.sum(-1)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy on the teacher's text: (N, V) logits, (N,) labels."""
    return _masked_mean(F.cross_entropy(student_logits.float(), labels.long(), reduction="none"), mask)


@dataclass(frozen=True)
class Objective:
    kind: Kind = "forward_kl"
    beta: float = 0.5  # jsd
    skew_alpha: float = 0.1  # skew_*
    temperature: float = 1.0


def _mix(a_lp: torch.Tensor, b_lp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1-w)·b) for 0 < w < 1, stable."""
    return torch.logsumexp(torch.stack([a_lp + math.log(weight_a), b_lp + math.log1p(-weight_a)]), dim=0)


def divergence_rows(teacher_lp: torch.Tensor, student_lp: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per-row divergence between two (N, C) log-probability tables -> (N,)."""
    kind = objective.kind
    if kind == "forward_kl":
        return kl_from_logprobs(teacher_lp, student_lp)
    floored = teacher_lp.clamp(min=_LOG_FLOOR)
    if kind == "reverse_kl":
        return kl_from_logprobs(student_lp, floored)
    if kind == "jsd":
        beta = objective.beta
        if beta <= 0.0:
            return kl_from_logprobs(teacher_lp, student_lp)
        if beta >= 1.0:
            return kl_from_logprobs(student_lp, floored)
        mixture = _mix(teacher_lp, student_lp, beta)
        return beta * kl_from_logprobs(teacher_lp, mixture) + (1 - beta) * kl_from_logprobs(student_lp, mixture)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        alpha = objective.skew_alpha
        if kind == "skew_forward_kl":
            return kl_from_logprobs(teacher_lp, student_lp if alpha <= 0 else _mix(teacher_lp, student_lp, alpha))
        return kl_from_logprobs(student_lp, floored if alpha <= 0 else _mix(student_lp, teacher_lp, alpha))
    if kind == "tvd":
        return 0.5 * (teacher_lp.exp() - student_lp.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence '{kind}' (known: {', '.join(KINDS)})")


def soften(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    return logprobs if temperature == 1.0 else F.log_softmax(logprobs / temperature, dim=-1)


def kd_sparse(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logprobs: torch.Tensor, objective: Objective | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Any divergence on the cached sparse target (k ids + tail), mean over tokens.

    With a temperature the student side is exact (its logits / T), while the teacher's stored
    (k+1)-bucket table is re-softened as if its tail were one token (the tail's inner shape is
    not stored): exact when the tail is empty, an approximation otherwise."""
    objective = objective or Objective()
    teacher_lp = soften(sparse_teacher_logprobs(topk_logprobs, tail_logprobs), objective.temperature)
    student_lp = sparse_student_logprobs(student_logits.float() / objective.temperature, topk_ids)
    rows = divergence_rows(teacher_lp, student_lp, objective)
    return _masked_mean(rows, mask) * objective.temperature ** 2


def kd_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: Objective | None = None,
             mask: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Any divergence on full logits (N, V) each, in row chunks of chunk_size, mean over tokens."""
    objective = objective or Objective()
    t = objective.temperature
    rows = [divergence_rows(F.log_softmax(tc.float() / t, -1), F.log_softmax(sc.float() / t, -1), objective)
            for sc, tc in zip(student_logits.split(chunk_size), teacher_logits.split(chunk_size))]
    return _masked_mean(torch.cat(rows), mask) * t ** 2  # split gives one (0, V) chunk for no tokens


# ---- across vocabularies (distill/xtok.py builds the inputs from the byte alignment) ----------
def mapped_sparse_table(student_logprobs: torch.Tensor, mapped_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                        tail_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's sparse target moved into the student's vocabulary, and the student's side.

    Each teacher top-k entry whose token spells the same bytes as a student token keeps its
    bucket (under the student id); the unmapped entries and the teacher's tail join one
    "rest" bucket. The student is gathered on the mapped ids plus its own rest (all its mass
    elsewhere), so both rows are distributions over the same k+1 buckets (unmapped columns
    hold zero mass on both sides).

    Args:
        student_logprobs: (M, V) the student's log-softmax rows.
        mapped_ids: (M, k) student ids of the teacher's k entries, -1 where unmapped (distinct
            within a row apart from -1).
        topk_logprobs: (M, k) the teacher's log-probs of its entries.
        tail_logprobs: (M,) the teacher's log-mass outside them.
    Returns:
        (teacher, student) log-prob tables, (M, k+1) each, the rest bucket last.
    """
    mapped = mapped_ids >= 0
    none = torch.tensor(float("-inf"), device=student_logprobs.device)
    teacher_lp = topk_logprobs.float()
    student_top = torch.where(mapped, student_logprobs.gather(-1, mapped_ids.clamp(min=0).long()), none)
    teacher_rest = torch.cat([torch.where(mapped, none, teacher_lp), tail_logprobs.float()[:, None]], -1).logsumexp(-1)
    student_rest = log1mexp(student_top.logsumexp(-1).clamp(max=_MAX_TOPK_LOGMASS))
    return (torch.cat([torch.where(mapped, teacher_lp, none), teacher_rest[:, None]], -1),
            torch.cat([student_top, student_rest[:, None]], -1))


def mapped_kd(student_logprobs: torch.Tensor, mapped_ids: torch.Tensor, topk_logprobs: torch.Tensor,
              tail_logprobs: torch.Tensor, objective: Objective | None = None) -> torch.Tensor:
    """Any divergence (forward KL by default) between the teacher's and the student's next-token
    distributions at positions where both predict the same string (a 1:1 byte group), on the
    mapped support plus one rest bucket (`mapped_sparse_table`); mean over the M rows.

    GOLD (TRL) splits the same rows into a matched KL and an unmatched ULD; X-Token (arXiv
    2605.21699) measured that dropping the unmatched mass can suppress tokens the student needs.
    The rest bucket keeps it in the target instead: the student is told how much mass the
    teacher puts outside the shared strings, without being told where.
    """
    teacher_lp, student_lp = mapped_sparse_table(student_logprobs, mapped_ids, topk_logprobs, tail_logprobs)
    rows = divergence_rows(teacher_lp, student_lp, objective or Objective())
    return _masked_mean(rows, None)


def alm_chunk_loss(student_chunk_logprobs: torch.Tensor, teacher_chunk_logprobs: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Approximate likelihood matching (Minixhofer, Vulić, Ponti 2025, arXiv 2503.20083: the ALM
    objective of their method section, the binarised f-divergence with KL as f): each aligned chunk (the same bytes, spelled by n teacher and m student
    tokens) is a binary event "the model writes exactly this chunk here", with probability
    p = exp(log-likelihood of its tokens / τ); the loss is the binarised f-divergence between
    the teacher's and the student's events, here KL(Bern(p_T) ‖ Bern(p_S)) =
    p_T log(p_T/p_S) + (1-p_T) log((1-p_T)/(1-p_S)), mean over the C chunks. (Their reference
    code, tokenkit's `binary_ce`, takes the binary cross-entropy, which differs by the
    teacher's binary entropy: the same gradient.) Log-likelihoods are capped at -1e-6, as
    tokenkit does, so that 1 - p stays positive.

    Args:
        student_chunk_logprobs: (C,) the student's summed log-probs of each chunk's tokens.
        teacher_chunk_logprobs: (C,) the teacher's, from its cached log-probs.
        temperature: τ, softening both events.
    Returns:
        The mean binary KL (0 for C = 0).
    """
    if not student_chunk_logprobs.numel():
        return student_chunk_logprobs.sum()
    t = teacher_chunk_logprobs.float().clamp(max=-1e-6) / temperature
    s = student_chunk_logprobs.float().clamp(max=-1e-6) / temperature
    per_chunk = t.exp() * (t - s) + (-torch.expm1(t)) * (log1mexp(t) - log1mexp(s))
    return per_chunk.mean()


def uld_sorted_l1(student_logprobs: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030: their ULD loss, the
    closed form of a Wasserstein-1 distance whose transport pairs the two vocabularies by
    rank): Σ_i |p_T(i) - p_S(i)| over probabilities sorted in decreasing order, no vocabulary
    map needed. The cached teacher knows its k largest only, so the sum runs over the first k
    ranks (the rest of both sides is left out, where the paper pads the smaller vocabulary
    with zeros). Mean over rows.

    Args:
        student_logprobs: (G, V) the student's log-softmax rows.
        topk_logprobs: (G, k) the teacher's k largest log-probs (any order).
    Returns:
        The mean sorted-probability L1 over the first k ranks.
    """
    k = topk_logprobs.shape[-1]
    teacher = topk_logprobs.float().exp().sort(-1, descending=True).values
    student = student_logprobs.float().topk(k, -1).values.exp()
    return _masked_mean((teacher - student).abs().sum(-1), None)


# GOLD clamps every probability it takes the log of at 1e-8 (its matched JSD and its merge factors).
_GOLD_LOG_EPS = math.log(1e-8)


def _gjsd_entries(teacher_lp: torch.Tensor, student_lp: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise generalized JSD(β) terms as TRL's GKD/GOLD write them (β = 0 forward KL,
    β = 1 reverse KL), on entries that need not sum to 1."""
    if beta <= 0.0:
        return teacher_lp.exp() * (teacher_lp - student_lp)
    if beta >= 1.0:
        return student_lp.exp() * (student_lp - teacher_lp)
    mixture = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log1p(-beta))
    return beta * teacher_lp.exp() * (teacher_lp - mixture) + (1 - beta) * student_lp.exp() * (student_lp - mixture)


def gold_hybrid_loss(student_logprobs: torch.Tensor, student_log_factor: torch.Tensor, exact_ids: torch.Tensor,
                     teacher_logprobs: torch.Tensor, student_matched: torch.Tensor, example_of: torch.Tensor,
                     matched_weight: float, unmatched_weight: float, beta: float = 0.5) -> torch.Tensor:
    """GOLD's hybrid ULD loss (TRL `trl/experimental/gold`, `uld_use_hybrid_loss`), the baseline
    next to ours, on the teacher's cached top-k (distill/xtok.py's docstring: what GOLD computes and
    where this differs). Per aligned group, both sides' "merged" rows: the distribution of the
    group's first token times the probability of the group's later tokens (a scalar, 1 at 1:1
    groups; unnormalised, as in GOLD). Then
      matched    Σ over the teacher's top-k entries whose token string is exactly a student token
                 string: generalized JSD(β) terms between the two merged probabilities (each
                 clamped at 1e-8 before the log, no renormalisation);
      unmatched  Σ_r |t_r - s_r| over probabilities sorted in decreasing order: the teacher's
                 unmatched top-k entries against the student's largest probabilities on ids that
                 are no teacher token's exact-string image, over the ranks the cache determines
                 (as many as the teacher has unmatched entries in its top-k);
    row loss = matched_weight·matched + unmatched_weight·unmatched, averaged over each sequence's
    groups and then over the sequences (GOLD's reduction).

    Args:
        student_logprobs: (H, V) the student's log-softmax rows at each group's first token.
        student_log_factor: (H,) the student's summed log-probs of the group's later tokens.
        exact_ids: (H, k) student id with the same token string per teacher entry, -1 for none.
        teacher_logprobs: (H, k) the teacher's merged log-probs of its top-k entries.
        student_matched: (V_s,) bool, student ids that some teacher token matches exactly
            (padded with False, or cut, to V).
        example_of: (H,) which sequence each row belongs to.
        matched_weight, unmatched_weight: GOLD's hybrid weights.
        beta: the JSD's β (GOLD's `beta`).
    Returns:
        The scalar loss (0 for H = 0).
    """
    if not student_logprobs.shape[0]:
        return student_logprobs.sum() * 0.0
    k = teacher_logprobs.shape[-1]
    student = student_logprobs.float() + student_log_factor.float()[:, None]  # (H, V) merged
    teacher = teacher_logprobs.float()
    known = torch.isfinite(teacher)
    matched = known & (exact_ids >= 0)
    unmatched = known & ~matched
    entries = _gjsd_entries(teacher.clamp(min=_GOLD_LOG_EPS),
                            student.gather(-1, exact_ids.clamp(min=0).long()).clamp(min=_GOLD_LOG_EPS), beta)
    matched_rows = torch.where(matched, entries, torch.zeros_like(entries)).sum(-1)
    width = student.shape[-1]
    mask = student_matched.to(device=student.device, dtype=torch.bool)[:width]
    mask = torch.cat([mask, mask.new_zeros(width - len(mask))])
    student_sorted = student.masked_fill(mask, float("-inf")).topk(min(k, width), -1).values.exp()
    student_sorted = torch.cat([student_sorted, student_sorted.new_zeros(len(student), k - student_sorted.shape[-1])], -1)
    teacher_sorted = torch.where(unmatched, teacher.exp(), torch.zeros_like(teacher)).sort(-1, descending=True).values
    ranks = torch.arange(k, device=student.device)[None, :] < unmatched.sum(-1, keepdim=True)
    unmatched_rows = torch.where(ranks, (teacher_sorted - student_sorted).abs(), torch.zeros_like(teacher_sorted)).sum(-1)
    rows = matched_weight * matched_rows + unmatched_weight * unmatched_rows
    _, sequence = torch.unique(example_of, return_inverse=True)
    sums = rows.new_zeros(int(sequence.max()) + 1).index_add(0, sequence, rows)
    counts = torch.bincount(sequence, minlength=len(sums)).to(rows.dtype)
    return (sums / counts).mean()

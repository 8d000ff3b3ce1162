import math

import pytest
import torch
import torch.nn.functional as F

from edgedistill.distill.losses import (
    cross_entropy,
    kd_dense,
    kd_sparse,
    log1mexp,
    sparse_student_logprobs,
)


def _topk_target(teacher_logits, k):
    lp = F.log_softmax(teacher_logits, -1)
    top_lp, top_ids = lp.topk(k, -1)
    tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_lp, tail


def test_sparse_equals_dense_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11) * 2
    ids, lp, tail = _topk_target(teacher, k=11)
    assert torch.isneginf(tail).all()
    sparse = kd_sparse(student, ids, lp, tail)
    dense = kd_dense(student, teacher)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse, dense)


def test_zero_for_identical_distributions_sparse_and_dense():
    torch.manual_seed(1)
    logits = torch.randn(7, 50)
    ids, lp, tail = _topk_target(logits, k=8)
    assert kd_sparse(logits, ids, lp, tail).abs() < 1e-5
    assert kd_dense(logits, logits).abs() < 1e-6


def test_sparse_target_is_a_distribution_and_lower_bounds_dense_kl():
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 40), torch.randn(6, 40)
    ids, lp, tail = _topk_target(teacher, k=5)
    mass = torch.cat([lp, tail[:, None]], -1).exp().sum(-1)
    assert torch.allclose(mass, torch.ones(6), atol=1e-5)
    assert torch.allclose(sparse_student_logprobs(student, ids).exp().sum(-1), torch.ones(6), atol=1e-5)
    # Merging buckets can only lose information (data-processing inequality).
    assert kd_sparse(student, ids, lp, tail) <= kd_dense(student, teacher) + 1e-6


def test_golden_value_by_hand():
    # Teacher p = (0.5, 0.3, 0.2) over V=3, k=1 -> buckets (0.5, 0.5).
    # Student logits 0 -> q = (1/3, 1/3, 1/3) -> buckets (1/3, 2/3).
    # KL = 0.5 ln(0.5/(1/3)) + 0.5 ln(0.5/(2/3)) = 0.5 ln 1.5 + 0.5 ln 0.75
    expected = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    ids = torch.tensor([[0]])
    lp = torch.tensor([[math.log(0.5)]])
    tail = torch.tensor([math.log(0.5)])
    got = kd_sparse(torch.zeros(1, 3), ids, lp, tail)
    assert abs(got.item() - expected) < 1e-6


def test_gradients_finite_with_neg_inf_logprobs_and_all_masked_rows():
    student = torch.randn(4, 9, requires_grad=True)
    ids = torch.tensor([[0, 1]] * 4)
    lp = torch.tensor([[0.0, float("-inf")]] * 4)  # teacher certain of token 0
    tail = torch.full((4,), float("-inf"))
    loss = kd_sparse(student, ids, lp, tail, mask=torch.tensor([1, 0, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    student.grad = None
    loss = kd_sparse(student, ids, lp, tail, mask=torch.zeros(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(student.grad).all()


def test_student_tail_stays_finite_when_topk_holds_all_mass():
    logits = torch.tensor([[50.0, -50.0, -50.0]], requires_grad=True)
    out = sparse_student_logprobs(logits, torch.tensor([[0]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


def test_mask_selects_tokens():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    full = kd_dense(student[:2], teacher[:2])
    masked = kd_dense(student, teacher, mask=torch.tensor([1, 1, 0, 0]))
    assert torch.allclose(full, masked)


def test_dense_chunking_does_not_change_the_value():
    torch.manual_seed(4)
    student, teacher = torch.randn(37, 20), torch.randn(37, 20)
    assert torch.allclose(kd_dense(student, teacher, chunk_size=5),
                          kd_dense(student, teacher, chunk_size=1000), atol=1e-6)


def test_log1mexp_matches_reference():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -2.0, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)


def test_cross_entropy_matches_torch():
    logits, labels = torch.randn(6, 12), torch.randint(0, 12, (6,))
    assert torch.allclose(cross_entropy(logits, labels), F.cross_entropy(logits, labels))


# ---- the whole family ----------------------------------------------------------------------
from edgedistill.distill.losses import KINDS, Objective, divergence_rows  # noqa: E402

FAMILY = [Objective(kind) for kind in KINDS] + [Objective("jsd", beta=0.1), Objective("jsd", beta=0.9),
                                                Objective("skew_forward_kl", skew_alpha=0.3),
                                                Objective("forward_kl", temperature=2.0)]


def test_every_divergence_is_zero_for_identical_distributions_and_positive_otherwise():
    torch.manual_seed(2)
    logits, other = torch.randn(6, 40), torch.randn(6, 40)
    ids, lp, tail = _topk_target(logits, k=40)
    for objective in FAMILY:
        assert kd_dense(logits, logits, objective).abs() < 1e-5, objective
        assert kd_sparse(logits, ids, lp, tail, objective).abs() < 1e-4, objective
        assert kd_dense(other, logits, objective) > 1e-3, objective


def test_every_divergence_sparse_equals_dense_when_k_is_the_vocabulary():
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 13), torch.randn(5, 13) * 2
    ids, lp, tail = _topk_target(teacher, k=13)
    for objective in FAMILY:
        sparse, dense = kd_sparse(student, ids, lp, tail, objective), kd_dense(student, teacher, objective)
        assert torch.allclose(sparse, dense, atol=1e-4), (objective, sparse, dense)


def test_jsd_limits_and_skew_zero_are_the_plain_kls():
    torch.manual_seed(4)
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    forward, reverse = kd_dense(student, teacher, Objective("forward_kl")), kd_dense(student, teacher, Objective("reverse_kl"))
    assert torch.allclose(kd_dense(student, teacher, Objective("jsd", beta=0.0)), forward)
    assert torch.allclose(kd_dense(student, teacher, Objective("jsd", beta=1.0)), reverse)
    assert torch.allclose(kd_dense(student, teacher, Objective("skew_forward_kl", skew_alpha=0.0)), forward)
    assert torch.allclose(kd_dense(student, teacher, Objective("skew_reverse_kl", skew_alpha=0.0)), reverse)
    # JSD(β) is bounded by the entropy-free bound -β log β - (1-β) log(1-β) (≤ log 2 at β = 1/2)
    jsd = kd_dense(student * 20, -teacher * 20, Objective("jsd", beta=0.5))
    assert 0 < jsd <= math.log(2) + 1e-5


def test_family_golden_values_by_hand():
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    expect = {
        "forward_kl": 0.5 * math.log(2) + 0.5 * math.log(2 / 3),
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        "tvd": 0.25,
    }
    m = [0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.5 + 0.5 * 0.75]  # β = 0.5 mixture
    expect["jsd"] = 0.5 * sum(0.5 * math.log(0.5 / mi) for mi in m) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    s = [0.1 * 0.5 + 0.9 * 0.25, 0.1 * 0.5 + 0.9 * 0.75]  # skew α = 0.1: αp + (1-α)q
    expect["skew_forward_kl"] = sum(0.5 * math.log(0.5 / si) for si in s)
    for kind, value in expect.items():
        assert float(divergence_rows(p, q, Objective(kind))) == pytest.approx(value, abs=1e-6), kind


def test_family_gradients_finite_with_neg_inf_teacher_entries_and_all_masked_rows():
    torch.manual_seed(5)
    student = torch.randn(3, 6, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 2, 4]])
    lp = torch.tensor([[-0.1, -3.0, float("-inf")], [-0.5, -1.5, -2.5], [float("-inf")] * 3])
    tail = torch.tensor([-3.0, -1.2, 0.0])
    for objective in FAMILY:
        student.grad = None
        loss = kd_sparse(student, ids, lp, tail, objective, mask=torch.tensor([1.0, 1.0, 0.0]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), objective
        student.grad = None
        kd_sparse(student, ids, lp, tail, objective, mask=torch.zeros(3)).backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() == 0, objective

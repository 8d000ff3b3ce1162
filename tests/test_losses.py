import math

import numpy as np
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


def test_skew_kls_golden_values_by_hand():
    # p = (0.5, 0.5) teacher, q = (0.25, 0.75) student.
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    # skew_reverse_kl, α = 0.1: KL(q ‖ αq + (1-α)p), mixture (0.025 + 0.45, 0.075 + 0.45) = (0.475, 0.525):
    # 0.25 ln(0.25/0.475) + 0.75 ln(0.75/0.525) = -0.16046 + 0.26751 = 0.10704; plain reverse KL is 0.13081.
    skew_reverse = 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)
    assert float(divergence_rows(p, q, Objective("skew_reverse_kl"))) == pytest.approx(skew_reverse, abs=1e-6)
    assert skew_reverse == pytest.approx(0.10704, abs=1e-5)
    # α = 0.3. skew_forward_kl: KL(p ‖ 0.3p + 0.7q), mixture (0.325, 0.675): 0.5 ln(0.5/0.325) + 0.5 ln(0.5/0.675)
    # = 0.06534; skew_reverse_kl: KL(q ‖ 0.3q + 0.7p), mixture (0.425, 0.575): 0.06662.
    skew_forward = 0.5 * math.log(0.5 / 0.325) + 0.5 * math.log(0.5 / 0.675)
    skew_reverse = 0.25 * math.log(0.25 / 0.425) + 0.75 * math.log(0.75 / 0.575)
    assert (skew_forward, skew_reverse) == pytest.approx((0.06534, 0.06662), abs=1e-5)
    assert float(divergence_rows(p, q, Objective("skew_forward_kl", skew_alpha=0.3))) == pytest.approx(skew_forward, abs=1e-6)
    assert float(divergence_rows(p, q, Objective("skew_reverse_kl", skew_alpha=0.3))) == pytest.approx(skew_reverse, abs=1e-6)


def _reference_rows(kind: str, p: np.ndarray, q: np.ndarray, beta: float = 0.5, alpha: float = 0.1) -> np.ndarray:
    """Each divergence of the family written out in float64 on probability rows (N, C) -> (N,)."""
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    return {"forward_kl": lambda: kl(p, q), "reverse_kl": lambda: kl(q, p),
            "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
            "skew_forward_kl": lambda: kl(p, alpha * p + (1 - alpha) * q),
            "skew_reverse_kl": lambda: kl(q, alpha * q + (1 - alpha) * p),
            "tvd": lambda: 0.5 * np.abs(p - q).sum(-1)}[kind]()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.filterwarnings("error")  # nothing deprecated on the way (a softmax over an implicit dim)
def test_every_divergence_equals_a_float64_reference_on_a_fixed_random_pair(temperature):
    rng = np.random.default_rng(7)
    student, teacher = rng.normal(size=(5, 9)) * 2, rng.normal(size=(5, 9)) * 2
    soft = lambda x: np.exp(x / temperature) / np.exp(x / temperature).sum(-1, keepdims=True)  # noqa: E731
    p, q = soft(teacher), soft(student)
    mask = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    values = {}
    for objective in FAMILY + [Objective("skew_reverse_kl", skew_alpha=0.3), Objective("jsd", beta=0.2)]:
        objective = Objective(objective.kind, objective.beta, objective.skew_alpha, temperature)
        rows = _reference_rows(objective.kind, p, q, objective.beta, objective.skew_alpha) * temperature ** 2
        got = kd_dense(torch.tensor(student).float(), torch.tensor(teacher).float(), objective)
        assert float(got) == pytest.approx(rows.mean(), rel=1e-4), objective
        masked = kd_dense(torch.tensor(student).float(), torch.tensor(teacher).float(), objective,
                          mask=torch.tensor(mask))  # a float64 mask: the loss stays float32
        assert float(masked) == pytest.approx((rows * mask).sum() / 3, rel=1e-4) and masked.dtype == torch.float32
        # the sparse target over the whole vocabulary (empty tail) is the same distribution
        ids, lp, tail = _topk_target(torch.tensor(teacher).float(), k=9)
        sparse = kd_sparse(torch.tensor(student).float(), ids, lp, tail, objective)
        assert float(sparse) == pytest.approx(rows.mean(), rel=1e-4), objective
        values[(objective.kind, objective.beta, objective.skew_alpha)] = rows.mean()
    # Skewing moves a value: neither skew is its plain KL (the 0.690 vs 0.918 kind of gap).
    assert abs(values[("skew_reverse_kl", 0.5, 0.1)] - values[("reverse_kl", 0.5, 0.1)]) > 0.05
    assert abs(values[("skew_forward_kl", 0.5, 0.1)] - values[("forward_kl", 0.5, 0.1)]) > 0.05


def test_a_mask_down_to_one_token_gives_that_tokens_value():
    torch.manual_seed(6)
    student, teacher = torch.randn(3, 8), torch.randn(3, 8)
    ids, lp, tail = _topk_target(teacher, k=3)
    one = torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(kd_dense(student, teacher, mask=one), kd_dense(student[1:2], teacher[1:2]))
    assert torch.allclose(kd_sparse(student, ids, lp, tail, mask=one), kd_sparse(student[1:2], ids[1:2], lp[1:2], tail[1:2]))
    labels = torch.tensor([3, 5, 7])
    assert torch.allclose(cross_entropy(student, labels, mask=one), F.cross_entropy(student[1:2], labels[1:2]))
    # cross_entropy honours its mask: the mean over the two kept tokens
    two = torch.tensor([1.0, 0.0, 1.0])
    assert torch.allclose(cross_entropy(student, labels, mask=two), F.cross_entropy(student[[0, 2]], labels[[0, 2]]))


def test_at_temperature_1_the_stored_target_is_used_as_it_is():
    # A stored table whose buckets sum to 0.9 (float16 rounding, a clipped tail) is not
    # renormalised: p = (0.5 | tail 0.4), student uniform over 3 ids -> q = (1/3 | 2/3):
    # KL = 0.5 ln(0.5 / (1/3)) + 0.4 ln(0.4 / (2/3)) = 0.20273 - 0.20433 = -0.00160.
    expected = 0.5 * math.log(1.5) + 0.4 * math.log(0.6)
    got = kd_sparse(torch.zeros(1, 3), torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), torch.tensor([math.log(0.4)]))
    assert float(got) == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(-0.00160, abs=1e-5)


def test_zero_tokens_give_a_zero_loss_not_nan():
    empty, labels = torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)
    for objective in FAMILY:
        assert kd_dense(empty, empty, objective).item() == 0.0, objective
        assert kd_sparse(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0), objective).item() == 0.0
    assert cross_entropy(empty, labels).item() == 0.0
    assert cross_entropy(empty, labels, mask=torch.zeros(0)).item() == 0.0


def test_an_unknown_divergence_is_named():
    with pytest.raises(ValueError, match=r"^unknown divergence 'kl' \(known: forward_kl, reverse_kl, jsd, "):
        divergence_rows(torch.zeros(1, 2), torch.zeros(1, 2), Objective("kl"))

"""The fused chunked head+loss gives the loss and gradients of distill/losses.py on materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from edgedistill.distill.fused import DenseTarget, SparseTarget, fused_head_loss
from edgedistill.distill.losses import (
    KINDS,
    Objective,
    cross_entropy,
    kd_dense,
    kd_sparse,
)
from edgedistill.models.hf import sampled_step, sparse_step

N, H, V, K = 13, 8, 50, 6


def _setup(seed: int, bias: bool = False):
    torch.manual_seed(seed)
    hidden = torch.randn(N, H, dtype=torch.float64).float().requires_grad_()
    head = torch.nn.Linear(H, V, bias=bias)
    teacher_logits = torch.randn(N, V) * 2
    labels = torch.randint(0, V, (N,))
    return hidden, head, teacher_logits, labels


def _grads(loss, hidden, head):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


def _reference(hidden, head, labels, ce_weight, kd_weight, objective, teacher_logits=None, sparse=None):
    logits = head(hidden)
    loss = ce_weight * cross_entropy(logits, labels)
    if kd_weight and sparse is not None:
        loss = loss + kd_weight * kd_sparse(logits, *sparse, objective)
    elif kd_weight:
        loss = loss + kd_weight * kd_dense(logits, teacher_logits, objective)
    return loss


def _assert_same(fused, reference, hidden, head):
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-6), (fused, reference)
    grads = _grads(fused, hidden, head)
    for got, want in zip(grads, _grads(reference, hidden, head)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
    return grads


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_target_equals_the_unfused_losses(kind, temperature):
    hidden, head, teacher_logits, labels = _setup(0, bias=True)
    sparse = sparse_step(teacher_logits, K)
    objective = Objective(kind, beta=0.3, skew_alpha=0.2, temperature=temperature)
    fused, parts = fused_head_loss(hidden, head, labels, ce_weight=0.4, kd_weight=0.6, objective=objective,
                                   target=SparseTarget(*sparse), chunk_rows=5)
    _assert_same(fused, _reference(hidden, head, labels, 0.4, 0.6, objective, sparse=sparse), hidden, head)
    logits = head(hidden).detach()
    assert parts["ce"] == pytest.approx(float(cross_entropy(logits, labels)), rel=1e-5)
    assert parts["kd"] == pytest.approx(float(kd_sparse(logits, *sparse, objective)), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_target_equals_the_unfused_losses(kind):
    hidden, head, teacher_logits, labels = _setup(1)
    objective = Objective(kind, beta=0.7, skew_alpha=0.1, temperature=1.5)
    fused, _ = fused_head_loss(hidden, head, labels, ce_weight=0.25, kd_weight=0.75, objective=objective,
                               target=DenseTarget(lambda s, e: teacher_logits[s:e]), chunk_rows=4)
    _assert_same(fused, _reference(hidden, head, labels, 0.25, 0.75, objective, teacher_logits), hidden, head)


def test_sampled_targets_with_empty_tail_and_unused_ids():
    hidden, head, teacher_logits, labels = _setup(2)
    ids, lp, tail = sampled_step(teacher_logits, K, torch.Generator().manual_seed(0))
    assert torch.isneginf(lp).any() and torch.isneginf(tail).all()  # the awkward case: zero-weight slots
    fused, _ = fused_head_loss(hidden, head, labels, ce_weight=0.0, kd_weight=1.0,
                               target=SparseTarget(ids, lp, tail), chunk_rows=3)
    grads = _assert_same(fused, _reference(hidden, head, labels, 0.0, 1.0, Objective(), sparse=(ids, lp, tail)),
                         hidden, head)
    assert all(torch.isfinite(g).all() for g in grads)


def test_cross_entropy_alone_and_a_frozen_head():
    hidden, head, _, labels = _setup(3)
    head.weight.requires_grad_(False)  # LoRA: the head is not trained, its gradient is never formed
    fused, parts = fused_head_loss(hidden, head, labels, ce_weight=1.0, kd_weight=0.0, chunk_rows=N)
    reference = F.cross_entropy(head(hidden), labels)
    assert torch.allclose(fused, reference, rtol=1e-6)
    (got,), (want,) = torch.autograd.grad(fused, hidden), torch.autograd.grad(reference, hidden)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert "kd" not in parts


def test_chunking_does_not_change_the_result_and_kd_needs_a_target():
    hidden, head, teacher_logits, labels = _setup(4)
    target = SparseTarget(*sparse_step(teacher_logits, K))
    whole, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target, chunk_rows=N)
    rows_of_one, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target, chunk_rows=1)
    assert torch.allclose(whole, rows_of_one, rtol=1e-6)
    with pytest.raises(ValueError, match="target"):
        fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5)


def test_under_bf16_autocast_the_head_runs_in_bf16_and_gradients_keep_their_dtypes():
    hidden, head, teacher_logits, labels = _setup(5)
    target = SparseTarget(*sparse_step(teacher_logits, K))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target)
    reference = _reference(hidden, head, labels, 0.5, 0.5, Objective(), sparse=tuple(target.__dict__.values()))
    assert fused.dtype == torch.float32 and torch.allclose(fused, reference, rtol=2e-2)
    grads, want = _grads(fused, hidden, head), _grads(reference, hidden, head)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    for got, ref in zip(grads, want):
        assert torch.allclose(got, ref, rtol=5e-2, atol=2e-3), (got - ref).abs().max()
    in_fp32, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target)
    assert abs(fused.item() - in_fp32.item()) > 1e-5  # the head really ran in bf16


def test_a_scaled_loss_scales_every_gradient_and_a_second_backward_is_refused():
    hidden, head, teacher_logits, labels = _setup(6, bias=True)
    target = SparseTarget(*sparse_step(teacher_logits, K))
    fused, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target)
    reference = _reference(hidden, head, labels, 0.5, 0.5, Objective(), sparse=(target.ids, target.logprobs, target.tail))
    _assert_same(fused * 0.25, reference * 0.25, hidden, head)  # gradient accumulation divides the loss
    again, _ = fused_head_loss(hidden, head, labels, ce_weight=0.5, kd_weight=0.5, target=target)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        again.backward()

"""LM head and loss fused, in row chunks, the gradient computed during the forward pass.

loss = (ce_weight·Σ CE + kd_weight·Σ D(teacher ‖ student)) / N over the N answer positions,
from the final hidden states (N, H) and the head weight (V, H): each chunk of rows gets its
logits, its loss and d loss / d logits at once, then d/d hidden and d/d weight by two
matmuls, and the logits are dropped. The (N, V) logits never exist whole — for N = 4096 and a
152k vocabulary they would be 2.5 GB in float32, twice with their gradient — and the loss's
elementwise passes over them (log-softmax, exp, gather, scatter, and their backward) fall
from a dozen to about four, because the gradient of a sparse target is written by hand:
the student's (k+1)-bucket table depends on the logits only through its k gathered
log-softmax entries, so autograd runs on (c, k) tensors and the (c, V) gradient is
softmax·a + scatter(b), formed in place in the log-softmax buffer.

Why our own: Liger-Kernel's fused linear cross-entropy / JSD and Apple's Cut Cross-Entropy
do this for GPUs in Triton only (nothing for CPU), and neither takes the cached sparse
top-k + tail target. Dense teacher targets (online mode) use the same chunking with autograd
on each chunk's logits. Values and gradients equal those of distill/losses.py on
materialised logits (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgedistill.distill.losses import (
    Objective,
    divergence_rows,
    soften,
    sparse_table,
    sparse_teacher_logprobs,
)

_CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk: big matmuls, bounded memory


@dataclass
class SparseTarget:
    """The teacher's top-k (or sampled) ids and log-probs plus its tail, per answer row."""

    ids: torch.Tensor  # (N, k)
    logprobs: torch.Tensor  # (N, k)
    tail: torch.Tensor  # (N,)


@dataclass
class DenseTarget:
    """The teacher's full logits, produced one chunk of rows at a time: logits_of(start, end) -> (c, V)."""

    logits_of: Callable[[int, int], torch.Tensor]


@dataclass
class _Spec:
    labels: torch.Tensor
    ce_weight: float
    kd_weight: float
    objective: Objective
    target: SparseTarget | DenseTarget | None
    chunk_rows: int
    sums: dict[str, float] = field(default_factory=dict)


def default_chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_BYTES // (4 * vocab))


def _sparse_chunk_grad(z: torch.Tensor, labels: torch.Tensor, target: SparseTarget | None, spec: _Spec,
                       rows: slice) -> tuple[torch.Tensor, float, float]:
    """d(chunk loss sum)/dz for the chunk's float32 logits z (c, V), by hand.

    With log-softmax l = z - lse, CE is -l[label] and the student's sparse table depends on
    z only through l[ids] (its tail is a function of those), so autograd runs on the (c, k)
    gather g = dD/dl[ids], and d/dz = softmax·(ce_w - kd_w·Σg) + scatter(kd_w·g at ids, -ce_w
    at label). At temperature t the KD side uses l_t = log_softmax(z / t), scaled by 1/t.
    The buffer of l becomes the gradient in place: ~4 passes over (c, V) in all."""
    t = spec.objective.temperature
    log_p = torch.log_softmax(z, dim=-1)  # (c, V)
    ce_sum = -float(log_p.gather(1, labels[:, None]).sum())
    kd_sum, coefficient = 0.0, torch.full((z.shape[0], 1), spec.ce_weight, dtype=z.dtype, device=z.device)
    if spec.kd_weight:
        ids = target.ids[rows].long()
        log_p_t = log_p if t == 1.0 else torch.log_softmax(z / t, dim=-1)
        with torch.enable_grad():
            top = log_p_t.gather(1, ids).requires_grad_()
            teacher = soften(sparse_teacher_logprobs(target.logprobs[rows], target.tail[rows]), t)
            kd = divergence_rows(teacher, sparse_table(top), spec.objective).sum() * t ** 2
            (grad_top,) = torch.autograd.grad(kd, top)
        kd_sum, grad_top = kd.detach().item(), grad_top * (spec.kd_weight / t)
        if t == 1.0:
            coefficient -= grad_top.sum(-1, keepdim=True)
        else:
            log_p_t.exp_().mul_(-grad_top.sum(-1, keepdim=True))
    grad = log_p.exp_().mul_(coefficient)
    if spec.kd_weight and t != 1.0:
        grad.add_(log_p_t)
    if spec.kd_weight:
        grad.scatter_add_(1, ids, grad_top)
    if spec.ce_weight:
        grad.scatter_add_(1, labels[:, None], coefficient.new_full((len(labels), 1), -spec.ce_weight))
    return grad, ce_sum, kd_sum


def _dense_chunk_grad(z: torch.Tensor, labels: torch.Tensor, target: DenseTarget | None, spec: _Spec,
                      rows: slice) -> tuple[torch.Tensor, float, float]:
    """d(chunk loss sum)/dz by autograd on the chunk's logits (any target, any divergence)."""
    t = spec.objective.temperature
    with torch.enable_grad():
        z = z.requires_grad_()
        ce = F.cross_entropy(z, labels, reduction="sum")
        total = spec.ce_weight * ce
        kd = z.new_zeros(())
        if spec.kd_weight and target is not None:
            with torch.no_grad():
                teacher = F.log_softmax(target.logits_of(rows.start, rows.stop).float() / t, dim=-1)
            kd = divergence_rows(teacher, F.log_softmax(z / t, dim=-1), spec.objective).sum() * t ** 2
            total = total + spec.kd_weight * kd
        (grad,) = torch.autograd.grad(total, z)
    return grad, ce.detach().item(), kd.detach().item()


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: _Spec):
        n = hidden.shape[0]
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        ce_sum = kd_sum = 0.0
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, spec.chunk_rows):
                rows = slice(start, min(n, start + spec.chunk_rows))
                h = hidden[rows].to(dtype)
                z = F.linear(h, w, None if bias is None else bias.to(dtype)).float()
                labels = spec.labels[rows]
                if isinstance(spec.target, SparseTarget) or spec.kd_weight == 0.0:
                    grad, ce, kd = _sparse_chunk_grad(z, labels, spec.target, spec, rows)
                else:
                    grad, ce, kd = _dense_chunk_grad(z, labels, spec.target, spec, rows)
                ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
                grad = grad.div_(max(n, 1))
                grad_hidden[rows] = (grad.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad.T, h)
                    else:
                        grad_weight += (grad.T.to(dtype) @ h).float()
                if need_b:
                    grad_bias += grad.sum(0)
        # Held on ctx, not save_for_backward, so that backward can hand them over as the only
        # reference: autograd then adopts grad_weight as weight.grad instead of copying it.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        spec.sums = {"ce": ce_sum, "kd": kd_sum}
        loss = (spec.ce_weight * ce_sum + spec.kd_weight * kd_sum) / max(n, 1)
        return hidden.new_tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused head loss supports one backward pass (no retain_graph)")
        (grad_hidden, grad_weight, grad_bias), ctx.grads = ctx.grads, None
        scale = grad_loss.float()
        if bool(scale != 1.0):  # a plain loss.backward() gives 1: no (V, H) pass then
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * scale
            grad_bias = None if grad_bias is None else grad_bias * scale
        return (grad_hidden, None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
                None if grad_bias is None else grad_bias.to(ctx.weight_dtype), None)


def fused_head_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, *, ce_weight: float,
                    kd_weight: float, objective: Objective | None = None,
                    target: SparseTarget | DenseTarget | None = None,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the N rows of ce_weight·CE(labels) + kd_weight·D(target ‖ student), where the
    student's logits are head(hidden) (N, H) -> (N, V), never materialised at once.

    Returns the loss (differentiable w.r.t. hidden and the head's weight and bias) and its
    parts' means {"ce", "kd"} for logging. kd_weight > 0 needs a target.
    """
    if kd_weight and target is None:
        raise ValueError("kd_weight > 0 needs a teacher target")
    spec = _Spec(labels.long(), float(ce_weight), float(kd_weight), objective or Objective(), target,
                 chunk_rows or default_chunk_rows(head.weight.shape[0]))
    loss = _FusedHeadLoss.apply(hidden, head.weight, head.bias, spec)
    n = max(hidden.shape[0], 1)
    parts = {"ce": spec.sums["ce"] / n}
    if kd_weight:
        parts["kd"] = spec.sums["kd"] / n
    return loss, parts

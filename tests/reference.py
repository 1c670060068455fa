"""Materialised references for the fused op tests (they hold the full [N, V] logits: tests only).

``materialized(..., dtype=torch.float64)`` is the ground truth. ``materialized(..., dtype=None)`` is the
*naive same-dtype* computation a user would write (logits in the input dtype, log_softmax upcast to fp32,
autograd in the input dtype); its error vs fp64 sets the tolerance of the fused op:
error(ours) <= error(naive) + small tol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Result:
    logp: torch.Tensor
    lse: torch.Tensor
    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]

    def tensors(self):
        return {"logp": self.logp, "lse": self.lse, "d_hidden": self.d_hidden, "d_weight": self.d_weight,
                "d_bias": self.d_bias}


def materialized(hidden, weight, targets, bias=None, *, grad_logp, grad_lse=None, ignore_index=-100,
                 temperature=1.0, softcap=None, dtype=torch.float64) -> Result:
    """log_softmax(transform(hidden @ weight.T + bias))[targets] with autograd, in ``dtype``."""
    dtype = dtype or hidden.dtype
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    logits = F.linear(h, w, b)
    if temperature != 1.0:
        logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    lse = torch.where(mask, lse, torch.zeros_like(lse))
    objective = (logp * grad_logp.to(logp.dtype)).sum()
    if grad_lse is not None:
        objective = objective + (lse * grad_lse.to(lse.dtype)).sum()
    objective.backward()
    return Result(logp.detach(), lse.detach(), h.grad, w.grad, None if b is None else b.grad)


def max_error(value: Optional[torch.Tensor], truth: Optional[torch.Tensor]) -> float:
    assert (value is None) == (truth is None), "one of the tensors is missing"
    if value is None or truth.numel() == 0:
        return 0.0
    return (value.double() - truth.double()).abs().max().item()


def assert_close_to_reference(ours: Result, truth: Result, naive: Result, dtype: torch.dtype,
                              names=("logp", "lse", "d_hidden", "d_weight", "d_bias")) -> None:
    """error(ours) <= error(naive same-dtype) + tol, per tensor.

    tol = (4 * sqrt(K) * eps(fp32) + 2 * eps(dtype)) * (1 + max|truth|): the fp32 accumulation noise of a
    K-long reduction (K = V for logp, lse and d_hidden; K = N for d_weight and d_bias; its size depends on
    summation order, so the naive computation can get lucky) plus the rounding to the output dtype.
    """
    n = max(truth.logp.numel(), 1)
    vocab = truth.d_weight.shape[0] if truth.d_weight is not None else n
    reduction = {"logp": vocab, "lse": vocab, "d_hidden": vocab, "d_weight": n, "d_bias": n}
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
    ours_t, truth_t, naive_t = ours.tensors(), truth.tensors(), naive.tensors()
    for name in names:
        if truth_t[name] is None:
            assert ours_t[name] is None, f"{name}: expected no gradient"
            continue
        assert ours_t[name] is not None, f"{name}: missing gradient"
        assert ours_t[name].shape == truth_t[name].shape, f"{name}: shape {ours_t[name].shape}"
        assert torch.isfinite(ours_t[name]).all(), f"{name}: non-finite values"
        scale = 1.0 + (truth_t[name].abs().max().item() if truth_t[name].numel() else 0.0)
        tol = (4 * reduction[name] ** 0.5 * eps32 + 2 * eps) * scale
        err = max_error(ours_t[name], truth_t[name])
        budget = max_error(naive_t[name], truth_t[name]) + tol
        assert err <= budget, f"{name}: error {err:.3e} > naive error + tol = {budget:.3e} ({dtype})"

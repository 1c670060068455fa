"""Materialised references for the fused op tests (they hold the full [N, V] logits: tests only).

``materialized(..., dtype=torch.float64)`` is the ground truth. ``materialized(..., dtype=None)`` is the
*naive same-dtype* computation a user would write (logits in the input dtype, log_softmax upcast to fp32,
autograd in the input dtype); its error vs fp64 sets the tolerance of the fused op:
error(ours) <= error(naive) + small tol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F

STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class Result:
    logp: torch.Tensor
    lse: torch.Tensor
    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self):
        return {"logp": self.logp, "lse": self.lse, "d_hidden": self.d_hidden, "d_weight": self.d_weight,
                "d_bias": self.d_bias, **self.stats}


def transformed_logits(h, w, b, *, temperature=1.0, softcap=None, logit_scale=1.0):
    """softcap(logit_scale * (h @ w.T + b)) / temperature, in the dtype of the inputs."""
    logits = F.linear(h, w, b)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def materialized(hidden, weight, targets, bias=None, *, grad_logp, grad_lse=None, grad_entropy=None,
                 ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0, dtype=torch.float64) -> Result:
    """log_softmax(transform(hidden @ weight.T + bias))[targets] and the per-token statistics, with autograd
    through logp (and lse, entropy when their upstream gradients are given), in ``dtype``."""
    dtype = dtype or hidden.dtype
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    logits = transformed_logits(h, w, b, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    targets = targets.long()
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits - lse.unsqueeze(-1)
    logp = torch.where(mask, log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    probs = log_probs.exp()
    # 0 log 0 = 0, with a zero gradient where a bias masks an id (log p = -inf: p * log p would give NaN there)
    entropy = torch.where(mask, -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1), 0.0)
    lse = torch.where(mask, lse, 0.0)
    objective = (logp * grad_logp.to(logp.dtype)).sum()
    if grad_lse is not None:
        objective = objective + (lse * grad_lse.to(lse.dtype)).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy.to(entropy.dtype)).sum()
    objective.backward()
    with torch.no_grad():
        stats = {"entropy": entropy.detach(),
                 "log_sum_sq_probs": torch.where(mask, torch.logsumexp(2 * log_probs, dim=-1), 0.0),
                 "mean_logits": torch.where(mask, logits.mean(dim=-1), 0.0),
                 "is_top1": (logits.argmax(dim=-1) == targets) & mask}
    return Result(logp.detach(), lse.detach(), h.grad, w.grad, None if b is None else b.grad, stats)


def max_error(value: Optional[torch.Tensor], truth: Optional[torch.Tensor]) -> float:
    assert (value is None) == (truth is None), "one of the tensors is missing"
    if value is None or truth.numel() == 0:
        return 0.0
    return (value.double() - truth.double()).abs().max().item()


def top1_margin(hidden, weight, bias=None, **transform) -> torch.Tensor:
    """fp64 gap between the two largest logits of each row (where it is tiny, fp32 may pick another arg-max)."""
    logits = transformed_logits(hidden.double(), weight.double(), None if bias is None else bias.double(),
                                **transform)
    if logits.shape[-1] < 2:
        return torch.full(logits.shape[:-1], float("inf"), dtype=torch.float64)
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def assert_close_to_reference(ours: Result, truth: Result, naive: Result, dtype: torch.dtype,
                              names=("logp", "lse", "d_hidden", "d_weight", "d_bias")) -> None:
    """error(ours) <= error(naive same-dtype) + tol, per tensor.

    tol = (4 * sqrt(K) * eps(fp32) + 2 * eps(dtype)) * (1 + max|truth|): the fp32 accumulation noise of a
    K-long reduction (K = V for logp, lse, the statistics and d_hidden; K = N for d_weight and d_bias; its size
    depends on summation order, so the naive computation can get lucky) plus the rounding to the output dtype.
    """
    n = max(truth.logp.numel(), 1)
    vocab = truth.d_weight.shape[0] if truth.d_weight is not None else n
    reduction = {"logp": vocab, "lse": vocab, "d_hidden": vocab, "d_weight": n, "d_bias": n, "entropy": vocab,
                 "log_sum_sq_probs": vocab, "mean_logits": vocab}
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(dtype).eps
    ours_t, truth_t, naive_t = ours.tensors(), truth.tensors(), naive.tensors()
    for name in names:
        if truth_t[name] is None:
            assert ours_t[name] is None, f"{name}: expected no gradient"
            continue
        assert ours_t[name] is not None, f"{name}: missing"
        assert ours_t[name].shape == truth_t[name].shape, f"{name}: shape {ours_t[name].shape}"
        assert torch.isfinite(ours_t[name]).all(), f"{name}: non-finite values"
        scale = 1.0 + (truth_t[name].abs().max().item() if truth_t[name].numel() else 0.0)
        tol = (4 * reduction[name] ** 0.5 * eps32 + 2 * eps) * scale
        err = max_error(ours_t[name], truth_t[name])
        naive_err = max_error(naive_t[name], truth_t[name])
        # a naive computation that overflowed (NaN / inf where the truth is finite) sets no bar: tol alone
        budget = (naive_err if math.isfinite(naive_err) else 0.0) + tol
        assert err <= budget, f"{name}: error {err:.3e} > naive error + tol = {budget:.3e} ({dtype})"

"""Chunked torch backend: the readable reference of the fused linear -> log-prob op.

Tokens are processed in chunks; one chunk of logits ([chunk, V], fp32) is the only vocabulary-sized
buffer alive at a time (plus the temporaries of the ops applied to it). The chunk size is chosen so that
those buffers fit a working-memory budget. The backward recomputes each chunk's logits from the saved
log-sum-exp instead of storing probabilities. Runs on any device and dtype, float64 included.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

import torch

from .base import Filter, GradsNeeded, Grads, KernelOptions, LogitTransform, RowStats

#: Working-memory budget of the vocabulary-sized chunk buffers, in bytes.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
#: Number of [chunk, V] fp32 buffers alive at once (logits, probabilities, softcap slope, entropy term).
_LIVE_CHUNK_BUFFERS = 4


def default_chunk_size(num_tokens: int, vocab: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                       buffers: int = _LIVE_CHUNK_BUFFERS) -> int:
    """Tokens per chunk so that ``buffers`` fp32 [chunk, V] buffers fit the budget."""
    per_token = buffers * vocab * 4
    return max(1, min(num_tokens, workspace_bytes // per_token))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden_chunk, weight_acc, bias_acc, transform: LogitTransform, with_slope: bool = False):
    """(transformed logits [chunk, V], softcap slope [chunk, V] or None) in the accumulation dtype."""
    logits = hidden_chunk.to(weight_acc.dtype) @ weight_acc.T
    if bias_acc is not None:
        logits += bias_acc
    slope = None
    if transform.softcap is not None:
        logits = transform.pre_cap(logits)
        slope = transform.slope_of_pre_cap(logits) if with_slope else None
        logits = torch.tanh(logits).mul_(transform.softcap)
    elif transform.logit_scale != 1.0:
        logits *= transform.logit_scale
    if transform.temperature != 1.0:
        logits /= transform.temperature
    return logits, slope


def _first_argmax_is(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether the target is the first maximum of its row (torch.argmax semantics)."""
    return logits.argmax(dim=1) == targets


class TorchChunkedBackend:
    name = "torch"
    label = "torch"

    def missing_reason(self) -> Optional[str]:
        return None

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> Optional[Exception]:
        return None

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, options: KernelOptions,
                with_basis: bool = False, stats: FrozenSet[str] = frozenset(),
                filtering: Optional[Filter] = None) -> RowStats:
        """(``filtering`` is applied by the backward alone, from the recomputed logits.)"""
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accumulation_dtype(hidden.dtype)
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        new = lambda want, dtype=acc: torch.empty(n, dtype=dtype, device=hidden.device) if want else None  # noqa: E731
        out = RowStats(logp=new(True), lse=new(True), entropy=new("entropy" in stats),
                       log_sum_sq_probs=new("log_sum_sq_probs" in stats), mean_logits=new("mean_logits" in stats),
                       is_top1=new("is_top1" in stats, torch.bool),
                       basis=torch.empty(n, hidden.shape[1], dtype=acc, device=hidden.device) if with_basis else None)
        chunk = options.chunk_size or default_chunk_size(n, vocab)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            logits, slope = _chunk_logits(hidden[rows], weight_acc, bias_acc, transform, with_slope=with_basis)
            lse = torch.logsumexp(logits, dim=1)
            out.lse[rows] = lse
            out.logp[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
            if out.mean_logits is not None:
                out.mean_logits[rows] = logits.mean(dim=1)
            if out.is_top1 is not None:
                out.is_top1[rows] = _first_argmax_is(logits, targets[rows])
            if out.entropy is None and out.log_sum_sq_probs is None and out.basis is None:
                continue
            log_probs = logits - lse[:, None]
            probs = torch.exp(log_probs)
            if out.entropy is not None:  # H = -sum p log p (0 log 0 = 0 for masked tokens)
                out.entropy[rows] = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=1)
            if out.log_sum_sq_probs is not None:
                out.log_sum_sq_probs[rows] = torch.logsumexp(2 * log_probs, dim=1)
            if out.basis is not None:  # Q = (softmax * softcap slope) @ W
                if slope is not None:
                    probs *= slope
                out.basis[rows] = probs @ weight_acc
        return out

    def backward(self, grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                 transform: LogitTransform, options: KernelOptions, needed: GradsNeeded,
                 filtering: Optional[Filter] = None, live: Optional[torch.Tensor] = None) -> Grads:
        """With ``filtering``, the dL/dx of the skipped (token, block) pairs is set to 0 (no time saved: the
        reference of the rule)."""
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accumulation_dtype(hidden.dtype)
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        grad_hidden = torch.empty_like(hidden) if needed.hidden else None
        grad_weight = torch.zeros_like(weight_acc) if needed.weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if needed.bias else None

        # dL/dx = g * onehot(target) + p * (a + c * log p)   (module doc of base.py)
        g = grad_logp.to(acc)
        coef_a = -g if grad_lse is None else grad_lse.to(acc) - g
        coef_c = None
        if grad_entropy is not None:
            coef_a = coef_a - grad_entropy.to(acc) * entropy.to(acc)
            coef_c = -grad_entropy.to(acc)

        # filtering's rule holds its walked copy and the kept mask besides (Filter.keep)
        chunk = options.chunk_size or default_chunk_size(n, vocab, buffers=_LIVE_CHUNK_BUFFERS + 3 * (filtering is not None))
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            hidden_chunk = hidden[rows].to(acc)
            logits, slope = _chunk_logits(hidden_chunk, weight_acc, bias_acc, transform, with_slope=True)
            log_probs = logits.sub_(lse[rows, None])
            probs = torch.exp(log_probs)
            if coef_c is None:
                grad_logits = probs.mul_(coef_a[rows, None])
            else:  # p * log p -> 0 where p = 0 (a token masked out by a -inf bias)
                weights = torch.addcmul(coef_a[rows, None], coef_c[rows, None], log_probs)
                grad_logits = torch.where(probs > 0, probs * weights, 0.0)
            if filtering is not None:
                grad_logits *= filtering.keep(log_probs, targets[rows])
            grad_logits.scatter_add_(1, targets[rows, None], g[rows, None])
            if slope is not None:
                grad_logits *= slope
            if transform.chain != 1.0:
                grad_logits *= transform.chain
            del logits, log_probs, probs, slope
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight_acc).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)

        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )

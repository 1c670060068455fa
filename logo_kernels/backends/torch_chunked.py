"""Chunked torch backend: the readable reference of the fused linear -> log-prob op.

Tokens are processed in chunks; one chunk of logits ([chunk, V], fp32) is the only vocabulary-sized
buffer alive at a time (plus the temporaries of the ops applied to it). The chunk size is chosen so that
those buffers fit a working-memory budget. The backward recomputes each chunk's logits from the saved
log-sum-exp instead of storing probabilities.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import GradsNeeded, Grads, LogitTransform

#: Working-memory budget of the vocabulary-sized chunk buffers, in bytes.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
#: Number of [chunk, V] fp32 buffers alive at once in the backward (logits, probabilities, softcap slope).
_LIVE_CHUNK_BUFFERS = 3


def default_chunk_size(num_tokens: int, vocab: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Tokens per chunk so that ``_LIVE_CHUNK_BUFFERS`` fp32 [chunk, V] buffers fit the budget."""
    per_token = _LIVE_CHUNK_BUFFERS * vocab * 4
    return max(1, min(num_tokens, workspace_bytes // per_token))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden_chunk, weight_acc, bias_acc, transform: LogitTransform) -> torch.Tensor:
    """Transformed logits [chunk, V] in the accumulation dtype."""
    logits = hidden_chunk.to(weight_acc.dtype) @ weight_acc.T
    if bias_acc is not None:
        logits += bias_acc
    if transform.temperature != 1.0:
        logits /= transform.temperature
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap).mul_(transform.softcap)
    return logits


class TorchChunkedBackend:
    name = "torch"

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, chunk_size: Optional[int],
                with_basis: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accumulation_dtype(hidden.dtype)
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        basis = torch.empty(n, hidden.shape[1], dtype=acc, device=hidden.device) if with_basis else None
        chunk = chunk_size or default_chunk_size(n, vocab)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = _chunk_logits(hidden[start:end], weight_acc, bias_acc, transform)
            lse[start:end] = torch.logsumexp(logits, dim=1)
            logp[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            if basis is not None:  # Q = (softmax * softcap slope) @ W
                probs = torch.exp(logits - lse[start:end, None])
                if transform.softcap is not None:
                    probs *= transform.softcap_slope(logits)
                basis[start:end] = probs @ weight_acc
        return logp, lse, basis

    def backward(self, grad_logp, grad_lse, hidden, weight, bias, targets, lse, transform: LogitTransform,
                 chunk_size: Optional[int], needed: GradsNeeded) -> Grads:
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _accumulation_dtype(hidden.dtype)
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        grad_hidden = torch.empty_like(hidden) if needed.hidden else None
        grad_weight = torch.zeros_like(weight_acc) if needed.weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if needed.bias else None

        # dL/dlogits = g * onehot(target) + (g_lse - g) * softmax, both scaled by 1/temperature.
        coef_target = grad_logp.to(acc) / transform.temperature
        coef_prob = -grad_logp.to(acc) if grad_lse is None else grad_lse.to(acc) - grad_logp.to(acc)
        coef_prob = coef_prob / transform.temperature

        chunk = chunk_size or default_chunk_size(n, vocab)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hidden_chunk = hidden[start:end].to(acc)
            logits = _chunk_logits(hidden_chunk, weight_acc, bias_acc, transform)
            grad_logits = torch.exp(logits - lse[start:end, None]).mul_(coef_prob[start:end, None])
            grad_logits.scatter_add_(1, targets[start:end, None], coef_target[start:end, None])
            if transform.softcap is not None:
                grad_logits *= transform.softcap_slope(logits)
            del logits
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits @ weight_acc).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)

        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )

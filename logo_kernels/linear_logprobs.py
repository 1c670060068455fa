"""``linear_logprobs``: per-token log-probabilities of targets straight from hidden states and the LM head.

The [tokens x vocab] logits are never materialised: a backend computes them tile by tile, keeps only the
log-sum-exp per token, and recomputes the tiles in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._validation import check_linear_inputs, check_target_range, check_transform
from .backends import Backend, GradsNeeded, LogitTransform, resolve_backend


class _LinearLogprobs(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] -> logp [N], lse [N] (fp32).

    Rows whose target is ``ignore_index`` are compacted away before the backend runs and get 0 in both
    outputs; their gradients are 0.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, transform: LogitTransform,
                backend: Backend, chunk_size: Optional[int]):
        n = hidden.shape[0]
        kept = (targets != ignore_index).nonzero().squeeze(1)
        compact = kept.numel() != n
        h = hidden.index_select(0, kept) if compact else hidden
        t = targets.index_select(0, kept) if compact else targets

        logp_kept, lse_kept = backend.forward(h.contiguous(), weight.contiguous(), bias, t.contiguous(),
                                              transform, chunk_size)
        if compact:  # scatter back; ignored rows keep 0
            logp = logp_kept.new_zeros(n).index_copy_(0, kept, logp_kept)
            lse = lse_kept.new_zeros(n).index_copy_(0, kept, lse_kept)
        else:
            logp, lse = logp_kept, lse_kept.clone()  # lse_kept is saved for backward: never hand it out

        ctx.save_for_backward(hidden, weight, bias, t, kept, lse_kept)
        ctx.compact = compact
        ctx.transform, ctx.backend, ctx.chunk_size = transform, backend, chunk_size
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, bias, t, kept, lse_kept = ctx.saved_tensors
        needed = GradsNeeded(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                             bias is not None and ctx.needs_input_grad[2])
        if not needed.any:
            return (None,) * 8
        if grad_logp is None and grad_lse is None:
            grad_logp = torch.zeros(hidden.shape[0], dtype=lse_kept.dtype, device=hidden.device)
        if grad_logp is None:
            grad_logp = torch.zeros_like(grad_lse)

        h = hidden.index_select(0, kept) if ctx.compact else hidden
        g_logp = grad_logp.index_select(0, kept) if ctx.compact else grad_logp
        g_lse = None
        if grad_lse is not None:
            g_lse = grad_lse.index_select(0, kept) if ctx.compact else grad_lse

        d_h, d_w, d_b = ctx.backend.backward(
            g_logp.contiguous(), None if g_lse is None else g_lse.contiguous(), h.contiguous(),
            weight.contiguous(), bias, t.contiguous(), lse_kept, ctx.transform, ctx.chunk_size, needed,
        )
        if d_h is not None and ctx.compact:
            d_h = torch.zeros_like(hidden).index_copy_(0, kept, d_h)
        return d_h, d_w, d_b, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of each target token under ``softmax(hidden @ weight.T + bias)``, fused.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 (float64 with backend "torch", for gradcheck).
            ``hidden[..., t, :]`` predicts ``targets[..., t]`` (shift before calling).
        weight: [V, D], same dtype as ``hidden`` (the LM head).
        targets: [...] integer class ids in [0, V), or ``ignore_index``.
        bias: optional [V], same dtype as ``weight``.
        ignore_index: targets equal to it get log-prob 0 and zero gradient; they cost no compute.
        temperature: logits are divided by it.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (after the temperature).
        backend: "auto" (C++ on CPU when built, else chunked torch), "torch", "cpp" or "triton".
        chunk_size: tokens per chunk / tile; None picks one that bounds working memory.
        return_lse: also return the log-sum-exp of the (transformed) logits, 0 at ignored targets.

    Returns:
        float32 [...] log-probs (float64 for float64 inputs); with ``return_lse`` a pair (logp, lse).
        Differentiable w.r.t. hidden, weight and bias for any upstream gradient of logp and lse; the
        gradients come back in the dtypes of their inputs, accumulated in fp32.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    check_transform(temperature, softcap)
    check_target_range(targets, weight.shape[0], ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    impl = resolve_backend(backend, hidden.device, hidden.dtype)

    lead_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(torch.int64)
    transform = LogitTransform(float(temperature), None if softcap is None else float(softcap))
    logp, lse = _LinearLogprobs.apply(flat_hidden, weight, bias, flat_targets, ignore_index, transform, impl,
                                      chunk_size)
    logp = logp.view(lead_shape)
    return (logp, lse.view(lead_shape)) if return_lse else logp

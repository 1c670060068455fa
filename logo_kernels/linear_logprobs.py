"""``linear_logprobs``: per-token log-probabilities of targets straight from hidden states and the LM head.

The [tokens x vocab] logits are never materialised: a backend computes them tile by tile, keeps only the
log-sum-exp per token, and recomputes the tiles in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._validation import check_linear_inputs, check_target_range, check_transform
from .backends import Backend, GradsNeeded, LogitTransform, resolve_backend


def _grad_hidden_from_basis(grad_logp, grad_lse, target_rows, logp, lse, basis,
                            transform: LogitTransform) -> torch.Tensor:
    """dHidden of a frozen head without a GEMM: (g * slope_t * W[t] + (g_lse - g) * Q) / temperature.

    From dL/dx = g * onehot + (g_lse - g) * softmax, times the softcap slope, over the temperature, and
    dH = dL/dx @ W, with Q = (softmax * slope) @ W computed by the forward and target_rows = W[t] saved by
    it. slope_t is the softcap slope at the target logit x_t = logp + lse (1 without softcap).
    """
    acc = basis.dtype
    g = grad_logp.to(acc)
    coef_basis = -g if grad_lse is None else grad_lse.to(acc) - g
    coef_target = g
    if transform.softcap is not None:
        coef_target = g * transform.softcap_slope(logp + lse)
    d_h = torch.addcmul(coef_basis[:, None] * basis, coef_target[:, None], target_rows.to(acc))
    return d_h / transform.temperature if transform.temperature != 1.0 else d_h


class _LinearLogprobs(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] -> logp [N], lse [N] (fp32).

    Rows whose target is ``ignore_index`` are compacted away before the backend runs and get 0 in both
    outputs; their gradients are 0. When only ``hidden`` needs a gradient (a frozen LM head, as under
    LoRA) the forward also computes the gradient basis Q [n, D] fp32 and keeps the target rows W[t], so
    that the backward is elementwise and reads neither the weight (which may be re-partitioned by then, as
    under ZeRO-3) nor hidden: two GEMMs' worth of work in all instead of three, for ~n*D*6 bytes kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, transform: LogitTransform,
                backend: Backend, chunk_size: Optional[int]):
        n = hidden.shape[0]
        kept = (targets != ignore_index).nonzero().squeeze(1)
        compact = kept.numel() != n
        h = hidden.index_select(0, kept) if compact else hidden
        t = targets.index_select(0, kept) if compact else targets
        frozen_head = (ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                       and not (bias is not None and ctx.needs_input_grad[2]))

        logp_kept, lse_kept, basis = backend.forward(h.contiguous(), weight.contiguous(), bias, t.contiguous(),
                                                     transform, chunk_size, with_basis=frozen_head)
        if compact:  # scatter back; ignored rows keep 0
            logp = logp_kept.new_zeros(n).index_copy_(0, kept, logp_kept)
            lse = lse_kept.new_zeros(n).index_copy_(0, kept, lse_kept)
        else:  # the saved tensors are never handed out: in-place edits of outputs cannot corrupt them
            logp, lse = logp_kept.clone(), lse_kept.clone()

        if frozen_head:  # the backward needs Q and W[t]: neither W nor hidden is kept
            ctx.save_for_backward(None, None, None, t, kept, logp_kept, lse_kept, basis, weight.index_select(0, t))
        else:
            ctx.save_for_backward(hidden, weight, bias, t, kept, logp_kept, lse_kept, None, None)
        ctx.hidden_meta = (hidden.shape, hidden.dtype, hidden.device)
        ctx.has_bias = bias is not None
        ctx.compact = compact
        ctx.transform, ctx.backend, ctx.chunk_size = transform, backend, chunk_size
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, bias, t, kept, logp_kept, lse_kept, basis, target_rows = ctx.saved_tensors
        needed = GradsNeeded(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                             ctx.has_bias and ctx.needs_input_grad[2])
        hidden_shape, hidden_dtype, device = ctx.hidden_meta
        if not needed.any or (grad_logp is None and grad_lse is None):
            zeros = lambda x, want: torch.zeros_like(x) if want else None  # noqa: E731
            d_h = torch.zeros(hidden_shape, dtype=hidden_dtype, device=device) if needed.hidden else None
            return (d_h, zeros(weight, needed.weight), zeros(bias, needed.bias)) + (None,) * 5
        if grad_logp is None:
            grad_logp = torch.zeros_like(grad_lse)

        select = (lambda x: x.index_select(0, kept)) if ctx.compact else (lambda x: x)  # noqa: E731
        g_logp = select(grad_logp).contiguous()
        g_lse = None if grad_lse is None else select(grad_lse).contiguous()

        if basis is not None:  # frozen head: elementwise, no recomputation
            d_h, d_w, d_b = _grad_hidden_from_basis(g_logp, g_lse, target_rows, logp_kept, lse_kept, basis,
                                                    ctx.transform).to(hidden_dtype), None, None
        else:
            d_h, d_w, d_b = ctx.backend.backward(
                g_logp, g_lse, select(hidden).contiguous(), weight.contiguous(), bias, t.contiguous(), lse_kept,
                ctx.transform, ctx.chunk_size, needed,
            )
        if d_h is not None and ctx.compact:
            d_h = torch.zeros(hidden_shape, dtype=hidden_dtype, device=device).index_copy_(0, kept, d_h)
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

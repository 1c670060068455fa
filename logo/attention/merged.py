"""Responses over a prefix read in place, on CPU's flash attention: two flash calls per response, merged exactly.

For a plain layer (no softcap, sinks or window shorter than the row) each response attends to the whole prefix and
causally to itself. Two calls of torch's CPU flash kernel — queries of the response against the prefix keys (no
mask) and against its own keys (causal) — each return an output and a log-sum-exp; merged by their log-sum-exps
they give the attention over [prefix | response] exactly. The backward runs flash's backward once per key block with
the *merged* output and log-sum-exp (the identity ring attention rests on: the block's probabilities and the row
term dO·O are those of the whole softmax), so nothing is recomputed by hand. Keys and values are views of the row
(no per-response copy), key/value heads are native (no expansion), and only the outputs and log-sum-exps are saved.
"""
from __future__ import annotations

from typing import Sequence

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported(q: torch.Tensor) -> bool:
    """Where the CPU flash kernel runs: CPU tensors of a floating dtype it takes."""
    return q.device.type == "cpu" and q.dtype in DTYPES


def _flash(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_backward(grad, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal,
                                                                               scale=scale)


class _ResponsesOverPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix: int, lengths: tuple, scale: float):
        outs, lses = [], []
        start = prefix
        kp, vp = k[:, :, :prefix], v[:, :, :prefix]
        for n in lengths:
            qr = q[:, :, start:start + n]
            o1, l1 = _flash(qr, kp, vp, False, scale)
            o2, l2 = _flash(qr, k[:, :, start:start + n], v[:, :, start:start + n], True, scale)
            lse = torch.logaddexp(l1, l2)
            out = o1.float() * torch.exp(l1 - lse)[..., None] + o2.float() * torch.exp(l2 - lse)[..., None]
            outs.append(out.to(q.dtype))
            lses.append(lse)
            start += n
        out = torch.cat(outs, 2)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, 2))
        ctx.meta = (prefix, lengths, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        prefix, lengths, scale = ctx.meta
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        kp, vp = k[:, :, :prefix], v[:, :, :prefix]
        start, offset = prefix, 0
        grad_out = grad_out.contiguous()
        for n in lengths:
            qr, span = q[:, :, start:start + n], slice(offset, offset + n)
            o, l, g = out[:, :, span], lse[:, :, span], grad_out[:, :, span]
            dq1, dkp, dvp = _flash_backward(g, qr, kp, vp, o, l, False, scale)
            dq2, dko, dvo = _flash_backward(g, qr, k[:, :, start:start + n], v[:, :, start:start + n], o, l, True,
                                            scale)
            dq[:, :, start:start + n] = dq1 + dq2
            dk[:, :, :prefix] += dkp
            dv[:, :, :prefix] += dvp
            dk[:, :, start:start + n] += dko
            dv[:, :, start:start + n] += dvo
            start, offset = start + n, offset + n
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def responses_over_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, lengths: Sequence[int],
                          scale: float) -> torch.Tensor:
    """q [1, Hq, L, d], k / v [1, Hkv, L, d] of one packed row -> [1, Hq, sum(lengths), d]: the responses' attention
    (module doc). Differentiable w.r.t. q, k, v."""
    return _ResponsesOverPrefix.apply(q, k, v, int(prefix), tuple(int(n) for n in lengths), float(scale))

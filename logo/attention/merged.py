"""Plain layers on CPU's flash attention: the causal prefix, and responses over a prefix read in place.

For a plain layer (no softcap, sinks or window shorter than the row) each response attends to the whole prefix and
causally to itself. Two calls of torch's CPU flash kernel — queries of the response against the prefix keys (no
mask) and against its own keys (causal) — each return an output and a log-sum-exp; merged by their log-sum-exps
they give the attention over [prefix | response] exactly. The backward runs flash's backward once per key block with
the *merged* output and log-sum-exp (the identity ring attention rests on: the block's probabilities and the row
term dO·O are those of the whole softmax), so nothing is recomputed by hand. Keys and values are views of the row
(no per-response copy), key/value heads are native (no expansion), and only the outputs and log-sum-exps saved.

Grouped key/value heads in the backward: torch's flash backward with native grouped heads ran 1.16x slower than on
heads expanded to the queries (8K causal tokens, 4 / 1 heads, fp32, 2 cores; on par at 8 / 2). The backward here
folds each query group into the batch instead — query head ``h = kv * G + j`` becomes batch ``j``, head ``kv``, the
keys a stride-0 view across that batch (nothing copied) — and walks the keys in blocks and the queries a block sees
in row chunks of the same size. Beyond dQ itself (fp32), the per-query-head tensors are one call's dQ, dK, dV parts:
at most ``key_block * Hq * d`` values each, ``key_block`` sized from the attention's ``chunk_elements``. The forward
keeps native heads (as fast).
"""
from __future__ import annotations

from typing import Sequence

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported(q: torch.Tensor) -> bool:
    """Where the CPU flash kernel runs: CPU tensors of a floating dtype it takes."""
    return q.device.type == "cpu" and q.dtype in DTYPES


def key_block_for(q: torch.Tensor, elements: int) -> int:
    """Keys (and query rows) per folded backward call, so that the call's dQ, dK, dV parts hold at most ``elements``
    values each; at least 256 (flash's own key split is 512 at most, smaller blocks only add calls)."""
    heads, dim = q.shape[1], q.shape[-1]
    return max(256, elements // max(1, heads * dim))


def _flash(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_backward(grad, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal,
                                                                               scale=scale)


def _folded(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[1, Hq, n, ...] -> a [G, Hkv, n, ...] view: query head kv * G + j is batch j, head kv."""
    return t.view(kv_heads, t.shape[1] // kv_heads, *t.shape[2:]).transpose(0, 1)


def _unfolded(t: torch.Tensor) -> torch.Tensor:
    """[G, Hkv, n, d] -> [1, Hq, n, d] (inverse of :func:`_folded`)."""
    return t.transpose(0, 1).reshape(1, -1, *t.shape[2:])


def flash_backward(grad, q, k, v, out, lse, causal: bool, scale: float, key_block: int):
    """dQ, dK, dV of one flash call's share of the softmax given the row's ``out`` / ``lse``: q, grad, out
    [1, Hq, n, d], lse [1, Hq, n], k / v [1, Hkv, m, d]; ``causal`` (top-left) needs n == m. Grouped key/value heads
    take the folded walk, its keys in blocks of ``key_block`` (module doc). Each result is in the inputs' dtype or in
    fp32 (summed over blocks or over a query group): callers cast."""
    heads, kv_heads, n, m = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if kv_heads == heads:
        return _flash_backward(grad, q, k, v, out, lse, causal, scale)
    if causal and n != m:
        raise ValueError(f"a causal flash backward needs as many queries as keys, got {n} and {m}")
    groups = heads // kv_heads
    qf, gf, of, lf = (_folded(t, kv_heads) for t in (q, grad, out, lse))
    if max(n, m) <= key_block:  # one call: dQ straight from flash
        dq, dk, dv = _flash_backward(gf, qf, k.expand(groups, -1, -1, -1), v.expand(groups, -1, -1, -1), of, lf,
                                     causal, scale)
        return _unfolded(dq), dk.sum(0, keepdim=True, dtype=torch.float32), dv.sum(0, keepdim=True,
                                                                                    dtype=torch.float32)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # filled through its folded view: no copy
    dq_folded = _folded(dq, kv_heads)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for k0 in range(0, m, key_block):
        k1 = min(m, k0 + key_block)
        kb = k[:, :, k0:k1].expand(groups, -1, -1, -1)
        vb = v[:, :, k0:k1].expand(groups, -1, -1, -1)
        # causal: queries k0..k1 see the block's diagonal, queries past it all of it (in row chunks of key_block, so
        # a call's dQ part stays a block's worth), earlier ones none of it
        rows_seeing_all = range(k1 if causal else 0, n, key_block)
        spans = [(k0, k1, True)] if causal else []
        spans += [(r0, min(n, r0 + key_block), False) for r0 in rows_seeing_all]
        for q0, q1, diagonal in spans:
            rows = slice(q0, q1)
            dq_part, dk_part, dv_part = _flash_backward(gf[:, :, rows], qf[:, :, rows], kb, vb, of[:, :, rows],
                                                        lf[:, :, rows], diagonal, scale)
            dq_folded[:, :, rows] += dq_part
            dk[0, :, k0:k1] += dk_part.sum(0, dtype=torch.float32)
            dv[0, :, k0:k1] += dv_part.sum(0, dtype=torch.float32)
    return dq, dk, dv


class _CausalPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, key_block: int):
        out, lse = _flash(q, k, v, True, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (scale, key_block)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, key_block = ctx.meta
        dq, dk, dv = flash_backward(grad_out.contiguous(), q, k, v, out, lse, True, scale, key_block)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _ResponsesOverPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix: int, lengths: tuple, scale: float, key_block: int):
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
        ctx.meta = (prefix, lengths, scale, key_block)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        prefix, lengths, scale, key_block = ctx.meta
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        kp, vp = k[:, :, :prefix], v[:, :, :prefix]
        start, offset = prefix, 0
        grad_out = grad_out.contiguous()
        for n in lengths:
            qr, span, own = q[:, :, start:start + n], slice(offset, offset + n), slice(start, start + n)
            o, l, g = out[:, :, span], lse[:, :, span], grad_out[:, :, span]
            dq1, dkp, dvp = flash_backward(g, qr, kp, vp, o, l, False, scale, key_block)
            dq2, dko, dvo = flash_backward(g, qr, k[:, :, own], v[:, :, own], o, l, True, scale, key_block)
            dq[:, :, own] = dq1.float() + dq2.float()
            dk[:, :, :prefix] += dkp
            dv[:, :, :prefix] += dvp
            dk[:, :, own] += dko
            dv[:, :, own] += dvo
            start, offset = start + n, offset + n
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def causal_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_block: int) -> torch.Tensor:
    """q [1, Hq, p, d], k / v [1, Hkv, p, d] -> [1, Hq, p, d]: causal attention of the prefix (one flash call; the
    backward as in the module doc). Differentiable w.r.t. q, k, v."""
    return _CausalPrefix.apply(q, k, v, float(scale), int(key_block))


def responses_over_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, lengths: Sequence[int],
                          scale: float, key_block: int) -> torch.Tensor:
    """q [1, Hq, L, d], k / v [1, Hkv, L, d] of one packed row -> [1, Hq, sum(lengths), d]: the responses' attention
    (module doc; ``key_block``: :func:`key_block_for`). Differentiable w.r.t. q, k, v."""
    return _ResponsesOverPrefix.apply(q, k, v, int(prefix), tuple(int(n) for n in lengths), float(scale),
                                      int(key_block))

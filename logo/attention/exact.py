"""Exact attention over segments of one row: sliding windows, softcap, sinks and GQA, no key/value copies.

A :class:`Segment` is a run of queries of the row and the key blocks it sees. Each query and key has a
*frame index* — its index in the sequence it belongs to once unpacked (a response's k-th token sits at
``prefix_length + k``) — and query ``i`` sees key ``j`` iff ``j <= i`` and, with a window ``W``,
``j > i - W`` (transformers' convention). The softmax runs over all of a segment's key blocks and, with
sinks, one extra logit per head; softcap maps scores ``s -> cap * tanh(s / cap)`` first.

Memory: queries go in chunks sized so that one chunk's scores hold about ``chunk_elements`` values; key/value
blocks are read in place (views of the row), query heads are grouped over their key/value head (a
``[Hkv, G * C, d]`` chunk against ``[Hkv, K, d]`` keys), never expanded; the forward saves only the output and
the softmax's max and log-normaliser per query and head, and the backward recomputes each chunk's scores (flash-attention style).
Matmuls run in the inputs' dtype, softmax and accumulation in fp32 (as transformers' eager attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class KeyBlock:
    """Keys [start, stop) of the row; ``frame`` is the frame index of key ``start``."""

    start: int
    stop: int
    frame: int


@dataclass(frozen=True)
class Segment:
    """Queries [start, stop) of the row (frame index of ``start``: ``frame``) and the key blocks they see."""

    start: int
    stop: int
    frame: int
    keys: Tuple[KeyBlock, ...]


@dataclass(frozen=True)
class Spec:
    segments: Tuple[Segment, ...]
    scale: float
    softcap: Optional[float]
    window: Optional[int]
    chunk_elements: int
    key_valid: Optional[torch.Tensor] = None  # [Lk] bool: padding keys are never seen

    @property
    def first(self) -> int:
        """The first query row of the output span."""
        return min(seg.start for seg in self.segments)

    @property
    def length(self) -> int:
        """Rows of the output span [first, last segment's stop)."""
        return max(seg.stop for seg in self.segments) - self.first


def _chunks(spec: Spec, heads: int, device) -> Iterator[Tuple[int, int, List[Tuple[int, int, Optional[torch.Tensor]]]]]:
    """(first query, stop, [(first key, stop, mask [C, K] or None)]) of each query chunk (row indices)."""
    w = spec.window
    for seg in spec.segments:
        visible = sum(b.stop - b.start for b in seg.keys)
        if w is not None:
            visible = min(visible, w)
        step = max(1, spec.chunk_elements // (heads * max(1, visible)))
        for c0 in range(seg.start, seg.stop, step):
            c1 = min(seg.stop, c0 + step)
            q_first, q_last = seg.frame + c0 - seg.start, seg.frame + c1 - 1 - seg.start
            blocks = []
            for blk in seg.keys:
                lo = 0 if w is None else max(0, q_first - w + 1 - blk.frame)
                hi = min(blk.stop - blk.start, q_last + 1 - blk.frame)
                if lo >= hi:
                    continue
                k_first, k_last = blk.frame + lo, blk.frame + hi - 1
                full = k_last <= q_first and (w is None or k_first > q_last - w)
                mask = None
                if not full or spec.key_valid is not None:
                    qf = torch.arange(q_first, q_last + 1, device=device)[:, None]
                    kf = torch.arange(k_first, k_last + 1, device=device)[None, :]
                    mask = kf <= qf
                    if w is not None:
                        mask &= kf > qf - w
                    if spec.key_valid is not None:
                        mask &= spec.key_valid[blk.start + lo:blk.start + hi][None, :]
                blocks.append((blk.start + lo, blk.start + hi, mask))
            yield c0, c1, blocks


def _scores(qc, kb, mask, spec: Spec, groups: int):
    """Scores [Hkv, G * C, K] (fp32, softcapped, masked to -inf) and tanh(s / cap) when softcapped."""
    s = torch.bmm(qc, kb.transpose(1, 2)).float().mul_(spec.scale)
    t = None
    if spec.softcap is not None:
        t = torch.tanh(s.div_(spec.softcap))
        s = t * spec.softcap
    if mask is not None:
        kv, rows, keys = s.shape
        s.view(kv, groups, rows // groups, keys).masked_fill_(~mask, NEG_INF)
    return s, t


def _sink_logits(sinks, kv_heads: int, groups: int, rows: int):
    return sinks.float().view(kv_heads, groups, 1).expand(kv_heads, groups, rows).reshape(kv_heads, groups * rows)


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, spec: Spec):
        heads, _, d = q.shape
        kv_heads = k.shape[0]
        groups = heads // kv_heads
        out = q.new_zeros(q.shape[0], spec.length, d)
        # the softmax's max and log-normaliser, kept apart: p = exp((s - max) - log l) keeps the precision of a
        # softmax when the scores are large (exp(s - lse) would lose lse's rounding, ~1e-6 relative at lse ~ 30)
        peak = q.new_zeros((q.shape[0], spec.length), dtype=torch.float32)
        log_norm = torch.zeros_like(peak)
        for c0, c1, blocks in _chunks(spec, heads, q.device):
            rows, o0, o1 = c1 - c0, c0 - spec.first, c1 - spec.first
            qc = q[:, c0:c1].reshape(kv_heads, groups * rows, d)
            scores = [_scores(qc, k[:, a:b], mask, spec, groups)[0] for a, b, mask in blocks]
            sink = None if sinks is None else _sink_logits(sinks, kv_heads, groups, rows)
            m = torch.stack([s.amax(-1) for s in scores] + ([] if sink is None else [sink])).amax(0)
            m = m.masked_fill(m == NEG_INF, 0.0)  # a query that sees nothing (padding) outputs 0
            norm = torch.zeros_like(m) if sink is None else torch.exp(sink - m)
            acc = None
            for s, (a, b, _) in zip(scores, blocks):  # the scores become exp(s - max) in place
                e = s.sub_(m[..., None]).exp_()
                norm += e.sum(-1)
                term = torch.bmm(e.to(v.dtype), v[:, a:b]).float()
                acc = term if acc is None else acc.add_(term)
            norm = norm.masked_fill(norm == 0, 1.0)
            out[:, o0:o1] = acc.div_(norm[..., None]).view(heads, rows, d).to(out.dtype)
            peak[:, o0:o1] = m.view(heads, rows)
            log_norm[:, o0:o1] = norm.log().view(heads, rows)
        ctx.save_for_backward(q, k, v, sinks, out, peak, log_norm)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, out, peak, log_norm = ctx.saved_tensors
        spec: Spec = ctx.spec
        heads, _, d = q.shape
        kv_heads = k.shape[0]
        groups = heads // kv_heads
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        dsinks = None if sinks is None else torch.zeros(heads, dtype=torch.float32, device=sinks.device)
        for c0, c1, blocks in _chunks(spec, heads, q.device):
            rows = c1 - c0
            qc = q[:, c0:c1].reshape(kv_heads, groups * rows, d)
            o0, o1 = c0 - spec.first, c1 - spec.first
            doc = grad_out[:, o0:o1].reshape(kv_heads, groups * rows, d).to(v.dtype)
            delta = (doc.float() * out[:, o0:o1].reshape(kv_heads, groups * rows, d).float()).sum(-1)
            m = peak[:, o0:o1].reshape(kv_heads, groups * rows)[..., None]
            log_l = log_norm[:, o0:o1].reshape(kv_heads, groups * rows)[..., None]
            dqc = None
            for a, b, mask in blocks:
                kb, vb = k[:, a:b], v[:, a:b]
                s, t = _scores(qc, kb, mask, spec, groups)
                p = s.sub_(m).sub_(log_l).exp_()  # in place: two live [Hkv, G*C, K] tensors (four with softcap)
                dv[:, a:b] += torch.bmm(p.transpose(1, 2).to(v.dtype), doc).float()
                ds = p.mul_(torch.bmm(doc, vb.transpose(1, 2)).float().sub_(delta[..., None]))
                if t is not None:
                    ds.mul_(t.mul_(t).neg_().add_(1.0))
                ds = ds.mul_(spec.scale).to(q.dtype)
                term = torch.bmm(ds, kb).float()
                dqc = term if dqc is None else dqc.add_(term)
                dk[:, a:b] += torch.bmm(ds.transpose(1, 2), qc).float()
            if dqc is not None:
                dq[:, c0:c1] = dqc.view(heads, rows, d).to(dq.dtype)
            if dsinks is not None:
                p_sink = torch.exp(_sink_logits(sinks, kv_heads, groups, rows) - m[..., 0] - log_l[..., 0])
                dsinks -= (p_sink * delta).view(heads, rows).sum(-1)
        return (dq, dk.to(k.dtype), dv.to(v.dtype), None if dsinks is None else dsinks.to(sinks.dtype), None)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[Segment], *,
                      scale: float, softcap: Optional[float] = None, window: Optional[int] = None,
                      sinks: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None,
                      chunk_elements: int = 1 << 22) -> torch.Tensor:
    """Attention of one row (module doc). q [Hq, Lq, d], k / v [Hkv, Lk, d] (Hq a multiple of Hkv: query head h
    uses key/value head h // (Hq / Hkv)), sinks [Hq] or None, key_valid [Lk] bool or None. Returns the rows
    [first segment start, last segment stop) of the output, [Hq, span, d] in q's dtype (0 for rows of the span
    no segment covers). Differentiable w.r.t. q, k, v and sinks."""
    spec = Spec(tuple(segments), float(scale), softcap, window, int(chunk_elements), key_valid)
    return _SegmentAttention.apply(q, k, v, sinks, spec)

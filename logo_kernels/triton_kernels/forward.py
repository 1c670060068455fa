"""Forward: per token block, an online log-sum-exp over vocabulary tiles and the target logit in one pass.

Grid: one program per BLOCK_N tokens. The logits tiles live in registers only; outputs are fp32
``lse[n]`` and ``logp[n] = x[n, target] - lse[n]``, and on request (constexpr flags) the entropy
(H = log S - T / S with T = sum e^(x-m) (x - m), shifted by the running max), log sum p^2, the mean logit and
whether the target is the first arg-max. Columns past V and ``-inf`` logits (e.g. a masking bias) contribute
nothing to the softmax; a row whose logits are all ``-inf`` gets ``lse = -inf`` (refused by the caller).
With FILTER (gradient filtering) the vocabulary is walked in ``order`` and each row's maximum logit and log-sum-exp
per tile are stored in ``tmax`` / ``tlse`` [N, cdiv(V, BLOCK_V)] (the caller turns them into the backward's live
flags once lse is known).
"""
import triton
import triton.language as tl

from .tiles import logits_tile, transform, vocab_ids


@triton.jit
def forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, logp_ptr, lse_ptr, ent_ptr, lsq_ptr, mean_ptr, top1_ptr, order_ptr,
                   tmax_ptr, tlse_ptr, N, V, D, N_BUCKET, stride_h, stride_w, logit_scale, inv_temp, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                   WANT_ENTROPY: tl.constexpr, WANT_LSQ: tl.constexpr, WANT_MEAN: tl.constexpr,
                   WANT_TOP1: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    target = tl.load(t_ptr + rows, mask=row_mask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    max_before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    x_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        ids = vocab_ids(order_ptr, cols, col_mask, FILTER)
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, ids, row_mask, col_mask, D, stride_h, stride_w, HAS_BIAS,
                        DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        x = transform(z, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        if WANT_MEAN:
            xsum += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        if WANT_TOP1:
            max_before = tl.maximum(max_before, tl.max(tl.where(ids[None, :] < target[:, None], x, float("-inf")),
                                                       axis=1))
        tile_max = tl.max(x, axis=1)
        m_new = tl.maximum(m, tile_max)
        finite = m_new > float("-inf")
        alpha = tl.where(finite, tl.exp(m - m_new), 1.0)
        live = x > float("-inf")
        y = tl.where(live, x - m_new[:, None], 0.0)
        p = tl.where(live, tl.exp(y), 0.0)
        if WANT_ENTROPY:  # T' = alpha (T + (m - m_new) S) + sum p y   (no -inf * 0 where S = 0)
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            ent = alpha * (ent + shift) + tl.sum(p * tl.maximum(y, -200.0), axis=1)
        if WANT_LSQ:
            sq = sq * alpha * alpha + tl.sum(p * p, axis=1)
        tile_sum = tl.sum(p, axis=1)
        if FILTER:
            tile = rows * tl.cdiv(V, BLOCK_V) + v0 // BLOCK_V
            tl.store(tmax_ptr + tile, tile_max, mask=row_mask)
            tl.store(tlse_ptr + tile, m_new + tl.log(tile_sum), mask=row_mask)
        s = s * alpha + tile_sum
        m = m_new
        x_target += tl.sum(tl.where((ids[None, :] == target[:, None]) & col_mask[None, :], x, 0.0), axis=1)
    log_s = tl.log(s)
    lse = tl.where(m > float("-inf"), m + log_s, float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, x_target - lse, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ent_ptr + rows, log_s - ent / s, mask=row_mask)
    if WANT_LSQ:
        tl.store(lsq_ptr + rows, tl.log(sq) - 2.0 * log_s, mask=row_mask)
    if WANT_MEAN:
        tl.store(mean_ptr + rows, xsum / V, mask=row_mask)
    if WANT_TOP1:
        top1 = (x_target >= m) & (max_before < x_target)
        tl.store(top1_ptr + rows, top1.to(tl.int8), mask=row_mask)

"""Forward: per token block, an online log-sum-exp over vocabulary tiles and the target logit in one pass.

Grid: one program per BLOCK_N tokens. The logits tiles live in registers only; outputs are fp32
``lse[n]`` and ``logp[n] = x[n, target] - lse[n]``. Columns past V and ``-inf`` logits (e.g. a masking
bias) contribute nothing; a row whose logits are all ``-inf`` gets ``lse = -inf``.
"""
import triton
import triton.language as tl

from .tiles import capped, logits_tile


@triton.jit
def forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, logp_ptr, lse_ptr, N, V, D, stride_h, stride_w, inv_temp, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    target = tl.load(t_ptr + rows, mask=row_mask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        x = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                        HAS_BIAS, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_SOFTCAP:
            x = capped(x, softcap)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        finite = m_new > float("-inf")
        alpha = tl.where(finite, tl.exp(m - m_new), 1.0)
        p = tl.where(x > float("-inf"), tl.exp(x - m_new[:, None]), 0.0)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        x_target += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
    lse = tl.where(m > float("-inf"), m + tl.log(s), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, x_target - lse, mask=row_mask)

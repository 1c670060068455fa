"""Backward: dL/dx = (g * onehot(target) + (g_lse - g) * softmax(x)) / temperature (times the softcap slope),
recomputed tile by tile from the saved lse, then

* ``grad_hidden_kernel`` — one program per BLOCK_N tokens: dH[rows] += dx @ W[cols] over vocabulary
  tiles, accumulated in an fp32 buffer the program owns;
* ``grad_weight_kernel`` — one program per BLOCK_V vocabulary rows: dW[cols] += dx.T @ H[rows] over
  token tiles, and dBias[cols] += sum(dx), likewise owned.

No two programs write the same element, so the results are deterministic (no atomics).
"""
import triton
import triton.language as tl

from .tiles import add_product, cap_slope, capped, load_rows, logits_tile


@triton.jit
def _grad_logits(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, target, lse, coef_target, coef_prob, D,
                 stride_h, stride_w, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                    HAS_BIAS, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    x = capped(z, softcap) if HAS_SOFTCAP else z
    valid = row_mask[:, None] & col_mask[None, :] & (x > float("-inf"))
    p = tl.where(valid, tl.exp(x - lse[:, None]), 0.0)
    dx = coef_prob[:, None] * p + tl.where(cols[None, :] == target[:, None], coef_target[:, None], 0.0)
    if HAS_SOFTCAP:
        dx = dx * cap_slope(tl.where(valid, z, 0.0), softcap)
    return tl.where(row_mask[:, None] & col_mask[None, :], dx, 0.0)


@triton.jit
def _row_coefficients(t_ptr, g_ptr, glse_ptr, lse_ptr, rows, row_mask, inv_temp, HAS_GLSE: tl.constexpr):
    target = tl.load(t_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GLSE:
        coef_prob = tl.load(glse_ptr + rows, mask=row_mask, other=0.0) - g
    else:
        coef_prob = -g
    return target, lse, g * inv_temp, coef_prob * inv_temp


@triton.jit
def grad_hidden_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, glse_ptr, dh_ptr, N, V, D, stride_h, stride_w,
                       inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
                       DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    target, lse, coef_target, coef_prob = _row_coefficients(t_ptr, g_ptr, glse_ptr, lse_ptr, rows, row_mask,
                                                            inv_temp, HAS_GLSE)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        dx = _grad_logits(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, target, lse, coef_target, coef_prob,
                          D, stride_h, stride_w, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, DOT_FP32, BLOCK_N,
                          BLOCK_V, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            w = load_rows(w_ptr, cols, offs_d, stride_w, col_mask, d_mask)
            add_product(dh_ptr, rows, offs_d, D, row_mask, d_mask, dx, w, DOT_FP32)


@triton.jit
def grad_weight_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, glse_ptr, dw_ptr, db_ptr, N, V, D, stride_h,
                       stride_w, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_GLSE: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        target, lse, coef_target, coef_prob = _row_coefficients(t_ptr, g_ptr, glse_ptr, lse_ptr, rows, row_mask,
                                                                inv_temp, HAS_GLSE)
        dx = _grad_logits(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, target, lse, coef_target, coef_prob,
                          D, stride_h, stride_w, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, DOT_FP32, BLOCK_N,
                          BLOCK_V, BLOCK_D)
        if NEED_DB:
            db += tl.sum(dx, axis=0)
        if NEED_DW:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                d_mask = offs_d < D
                h = load_rows(h_ptr, rows, offs_d, stride_h, row_mask, d_mask)
                add_product(dw_ptr, cols, offs_d, D, col_mask, d_mask, tl.trans(dx), h, DOT_FP32)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)

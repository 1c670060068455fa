"""Backward: dL/dx = g * onehot(target) + p * (a + c * log p), a = g_lse - g - g_H * H, c = -g_H (H the entropy),
times the transform's chain rule (softcap slope, logit_scale / temperature), recomputed tile by tile from the
saved lse. Two schedules:

* deterministic (two kernels, every program owns the rows it writes, no atomics; the logits are recomputed
  twice, 10·N·V·D FLOPs per forward + backward):
  ``grad_hidden_kernel`` — one program per BLOCK_N tokens: dH[rows] += dx @ W[cols] over vocabulary tiles;
  ``grad_weight_kernel`` — one program per BLOCK_V vocabulary rows: dW[cols] += dx.T @ H[rows] over token
  tiles, and dBias[cols] += sum(dx);
* single recomputation (``grad_fused_kernel``, one program per (token block, vocabulary block) tile, grouped
  so that neighbouring programs share W tiles in L2): the tile's logits are recomputed once and give both
  dH (fp32 atomic adds into rows other programs also add to) and dW / dBias (likewise): 8·N·V·D FLOPs, the
  order of the additions — so the last bits — varying from run to run.

Gradient filtering (FILTER): the vocabulary is walked in the forward's ``order`` (positions ``cols``, vocabulary
ids ``order[cols]``), and a tile is skipped — neither recomputed nor multiplied — when no token of it has a live
(token, block) pair in the forward's ``live`` flags [N, cdiv(V, live_block)] overlapping the tile's columns.
"""
import triton
import triton.language as tl

from .tiles import add_product, atomic_add_product, cap_slope, load_rows, logits_tile, tile_is_live, transform, vocab_ids


@triton.jit
def _grad_logits(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, target, lse, coef_t, coef_a, coef_c, D,
                 stride_h, stride_w, logit_scale, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dz for the tile (z = hidden @ W.T + bias), with the chain factor folded into the coefficients."""
    z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, HAS_BIAS,
                    DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)  # cols: vocabulary ids
    x = transform(z, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    valid = row_mask[:, None] & col_mask[None, :] & (x > float("-inf"))
    log_p = tl.where(valid, x - lse[:, None], 0.0)
    p = tl.where(valid, tl.exp(log_p), 0.0)
    if HAS_ENT:  # log p clamped where exp(log p) is 0 anyway: keeps 0 * inf away
        dx = p * (coef_a[:, None] + coef_c[:, None] * tl.maximum(log_p, -200.0))
    else:
        dx = p * coef_a[:, None]
    dx += tl.where((cols[None, :] == target[:, None]) & col_mask[None, :], coef_t[:, None], 0.0)
    if HAS_SOFTCAP:
        dx = dx * cap_slope(tl.where(valid, z, 0.0), logit_scale, softcap)
    return tl.where(row_mask[:, None] & col_mask[None, :], dx, 0.0)


@triton.jit
def _tile_columns(v0, V, order_ptr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """The walk positions [v0, v0 + BLOCK_V), their mask (< V) and their vocabulary ids (through the filter's order)."""
    cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < V
    return cols, col_mask, vocab_ids(order_ptr, cols, col_mask, FILTER)


@triton.jit
def _row_coefficients(t_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, lse_ptr, rows, row_mask, chain,
                      HAS_GLSE: tl.constexpr, HAS_ENT: tl.constexpr):
    """(target, lse, coef_t = g, coef_a = g_lse - g - g_H H, coef_c = -g_H), the coefficients times chain."""
    target = tl.load(t_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    coef_a = -g
    if HAS_GLSE:
        coef_a += tl.load(glse_ptr + rows, mask=row_mask, other=0.0)
    coef_c = tl.zeros_like(g)
    if HAS_ENT:
        g_h = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        coef_a -= g_h * tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        coef_c = -g_h * chain
    return target, lse, g * chain, coef_a * chain, coef_c


@triton.jit
def grad_hidden_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, dh_ptr, order_ptr,
                       live_ptr, live_block, num_live_blocks, N, V, D, N_BUCKET, stride_h, stride_w, logit_scale,
                       inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
                       HAS_ENT: tl.constexpr, DOT_FP32: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    target, lse, coef_t, coef_a, coef_c = _row_coefficients(t_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, lse_ptr, rows,
                                                            row_mask, logit_scale * inv_temp, HAS_GLSE, HAS_ENT)
    for v0 in range(0, V, BLOCK_V):
        live = True
        if FILTER:
            live = tile_is_live(live_ptr, rows, row_mask, v0, live_block, num_live_blocks, BLOCK_V)
        if live:
            cols, col_mask, ids = _tile_columns(v0, V, order_ptr, FILTER, BLOCK_V)
            dx = _grad_logits(h_ptr, w_ptr, b_ptr, rows, ids, row_mask, col_mask, target, lse, coef_t, coef_a,
                              coef_c, D, stride_h, stride_w, logit_scale, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                              HAS_ENT, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                d_mask = offs_d < D
                w = load_rows(w_ptr, ids, offs_d, stride_w, col_mask, d_mask)
                add_product(dh_ptr, rows, offs_d, D, row_mask, d_mask, dx, w, DOT_FP32)


@triton.jit
def grad_weight_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, dw_ptr, db_ptr,
                       order_ptr, live_ptr, live_block, num_live_blocks, N, V, D, N_BUCKET, stride_h, stride_w,
                       logit_scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_GLSE: tl.constexpr, HAS_ENT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       DOT_FP32: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    v0 = pid * BLOCK_V
    cols, col_mask, ids = _tile_columns(v0, V, order_ptr, FILTER, BLOCK_V)  # ids: the dW rows this program owns
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        live = True
        if FILTER:
            live = tile_is_live(live_ptr, rows, row_mask, v0, live_block, num_live_blocks, BLOCK_V)
        if live:
            target, lse, coef_t, coef_a, coef_c = _row_coefficients(t_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr,
                                                                    lse_ptr, rows, row_mask, logit_scale * inv_temp,
                                                                    HAS_GLSE, HAS_ENT)
            dx = _grad_logits(h_ptr, w_ptr, b_ptr, rows, ids, row_mask, col_mask, target, lse, coef_t, coef_a,
                              coef_c, D, stride_h, stride_w, logit_scale, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                              HAS_ENT, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
            if NEED_DB:
                db += tl.sum(dx, axis=0)
            if NEED_DW:
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                    d_mask = offs_d < D
                    h = load_rows(h_ptr, rows, offs_d, stride_h, row_mask, d_mask)
                    add_product(dw_ptr, ids, offs_d, D, col_mask, d_mask, tl.trans(dx), h, DOT_FP32)
    if NEED_DB:
        tl.store(db_ptr + ids, db, mask=col_mask)


@triton.jit
def grad_fused_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, dh_ptr, dw_ptr, db_ptr,
                      order_ptr, live_ptr, live_block, num_live_blocks, N, V, D, N_BUCKET, stride_h, stride_w,
                      logit_scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_GLSE: tl.constexpr, HAS_ENT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                      NEED_DB: tl.constexpr, DOT_FP32: tl.constexpr, FILTER: tl.constexpr, GROUP_N: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # grouped order: GROUP_N token blocks run over one vocabulary block before the next, so W tiles stay in L2
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    group = pid // per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = (first_n + (pid % per_group) % group_size).to(tl.int64)
    pid_v = ((pid % per_group) // group_size).to(tl.int64)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    v0 = pid_v * BLOCK_V
    live = True
    if FILTER:
        live = tile_is_live(live_ptr, rows, row_mask, v0, live_block, num_live_blocks, BLOCK_V)
    if live:
        cols, col_mask, ids = _tile_columns(v0, V, order_ptr, FILTER, BLOCK_V)
        target, lse, coef_t, coef_a, coef_c = _row_coefficients(t_ptr, g_ptr, glse_ptr, gent_ptr, ent_ptr, lse_ptr,
                                                                rows, row_mask, logit_scale * inv_temp, HAS_GLSE,
                                                                HAS_ENT)
        dx = _grad_logits(h_ptr, w_ptr, b_ptr, rows, ids, row_mask, col_mask, target, lse, coef_t, coef_a, coef_c,
                          D, stride_h, stride_w, logit_scale, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, HAS_ENT,
                          DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        if NEED_DB:
            tl.atomic_add(db_ptr + ids, tl.sum(dx, axis=0), mask=col_mask, sem="relaxed")
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            if NEED_DH:
                w = load_rows(w_ptr, ids, offs_d, stride_w, col_mask, d_mask)
                atomic_add_product(dh_ptr, rows, offs_d, D, row_mask, d_mask, dx, w, DOT_FP32)
            if NEED_DW:
                h = load_rows(h_ptr, rows, offs_d, stride_h, row_mask, d_mask)
                atomic_add_product(dw_ptr, ids, offs_d, D, col_mask, d_mask, tl.trans(dx), h, DOT_FP32)

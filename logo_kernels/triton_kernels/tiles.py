"""The logits tile: z[BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols].T + bias[cols] in fp32, and its transform.

transform: x = softcap * tanh(logit_scale * z / softcap) * inv_temp (HAS_SOFTCAP), else x = logit_scale * z *
inv_temp — the order of Hugging Face models and TRL (the model's scale and softcap, then the temperature).
tanh and its slope are written without libdevice (unavailable under the interpreter), with t = exp(-2|u|):
tanh(u) = sign(u) (1 - t) / (1 + t) above |u| = 0.5 and its Taylor series below (where 1 - t cancels), and
1 - tanh(u)^2 = 4t / (1 + t)^2 — no overflow, and no cancellation where the cap saturates (more accurate there
than 1 - tanh^2).
Offsets are int64 (N·V and V·D may exceed 2^31).
DOT_FP32 casts the operands to fp32 before ``tl.dot`` (fp32 inputs; bf16 under the interpreter, whose
bf16 dot is wrong); otherwise fp16/bf16 operands go to the tensor cores with fp32 accumulation.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(u):
    """tanh to fp32 accuracy without libdevice: the Taylor series to u^15 below |u| = 0.5 (truncation < 1e-8
    relative), (1 - t) / (1 + t) with t = exp(-2|u|) above (no cancellation there, no overflow anywhere)."""
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    large = (1.0 - t) / (1.0 + t)
    q = a * a
    poly = -929569.0 / 638512875.0
    poly = poly * q + 21844.0 / 6081075.0
    poly = poly * q - 1382.0 / 155925.0
    poly = poly * q + 62.0 / 2835.0
    poly = poly * q - 17.0 / 315.0
    poly = poly * q + 2.0 / 15.0
    poly = poly * q - 1.0 / 3.0
    small = a + a * q * poly
    th = tl.where(a < 0.5, small, large)
    return tl.where(u < 0, -th, th)


@triton.jit
def transform(z, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """x = softcap(logit_scale * z) * inv_temp."""
    if HAS_SOFTCAP:
        return softcap * tanh(z * logit_scale / softcap) * inv_temp
    return z * (logit_scale * inv_temp)


@triton.jit
def cap_slope(z, logit_scale, softcap):
    """1 - tanh(logit_scale * z / softcap)^2: the softcap's derivative at z."""
    t = tl.exp(-2.0 * tl.abs(z * logit_scale / softcap))
    return 4.0 * t / ((1.0 + t) * (1.0 + t))


@triton.jit
def load_rows(ptr, rows, offs_d, stride, row_mask, d_mask):
    """tile[R, BLOCK_D] = ptr[rows, offs_d] of a row-major matrix (0 outside the masks)."""
    return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def add_product(out_ptr, rows, offs_d, D, row_mask, d_mask, a, b, DOT_FP32: tl.constexpr):
    """out[rows, offs_d] += a @ b in an fp32 [*, D] buffer whose rows this program owns (deterministic);
    ``a`` is fp32, ``b`` in the input dtype (cast to fp32 with DOT_FP32, else ``a`` is cast to b's dtype)."""
    out = out_ptr + rows[:, None] * D + offs_d[None, :]
    mask = row_mask[:, None] & d_mask[None, :]
    acc = tl.load(out, mask=mask, other=0.0)
    if DOT_FP32:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    tl.store(out, acc, mask=mask)


@triton.jit
def atomic_add_product(out_ptr, rows, offs_d, D, row_mask, d_mask, a, b, DOT_FP32: tl.constexpr):
    """out[rows, offs_d] += a @ b with fp32 atomic adds (several programs add into the same rows)."""
    if DOT_FP32:
        prod = tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        prod = tl.dot(a.to(b.dtype), b)
    tl.atomic_add(out_ptr + rows[:, None] * D + offs_d[None, :], prod, mask=row_mask[:, None] & d_mask[None, :],
                  sem="relaxed")


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = hidden[rows] @ weight[cols].T + bias[cols], fp32 (callers apply :func:`transform`)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        h = load_rows(h_ptr, rows, offs_d, stride_h, row_mask, d_mask)
        w = load_rows(w_ptr, cols, offs_d, stride_w, col_mask, d_mask)
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def vocab_ids(order_ptr, cols, col_mask, HAS_ORDER: tl.constexpr):
    """The vocabulary ids of the walk positions ``cols``: order[cols] (gradient filtering's sorted walk), else cols."""
    if HAS_ORDER:
        return tl.load(order_ptr + cols, mask=col_mask, other=0)
    return cols


@triton.jit
def tile_is_live(live_ptr, rows, row_mask, v0, live_block, num_live_blocks, BLOCK_V: tl.constexpr):
    """Whether any token of ``rows`` has a live (token, vocabulary block) pair among the blocks of ``live_block``
    walk positions that overlap [v0, v0 + BLOCK_V) (``live`` [N, num_live_blocks] int8, from the forward)."""
    first = v0 // live_block
    last = tl.minimum((v0 + BLOCK_V - 1) // live_block, num_live_blocks - 1)
    acc = tl.zeros_like(row_mask).to(tl.int32)
    for b in range(first, last + 1):
        flags = tl.load(live_ptr + rows * num_live_blocks + b, mask=row_mask, other=0)
        acc = tl.maximum(acc, flags.to(tl.int32))
    return tl.max(acc, axis=0) > 0

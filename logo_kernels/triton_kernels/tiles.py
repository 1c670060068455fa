"""The logits tile: x[BLOCK_N, BLOCK_V] = transform(hidden[rows] @ weight[cols].T + bias[cols]) in fp32.

transform: times ``inv_temp`` gives z; with HAS_SOFTCAP the tile is ``softcap * tanh(z / softcap)``.
tanh and its slope are written with t = exp(-2|u|) (libdevice is unavailable under the interpreter):
tanh(u) = sign(u) (1 - t) / (1 + t) and 1 - tanh(u)^2 = 4t / (1 + t)^2 — no overflow, and the slope has
no cancellation where the cap saturates (it is more accurate there than 1 - (x / softcap)^2).
Offsets are int64 (N·V and V·D may exceed 2^31).
DOT_FP32 casts the operands to fp32 before ``tl.dot`` (fp32 inputs; bf16 under the interpreter, whose
bf16 dot is wrong); otherwise fp16/bf16 operands go to the tensor cores with fp32 accumulation.
"""
import triton
import triton.language as tl


@triton.jit
def capped(z, softcap):
    """softcap * tanh(z / softcap)."""
    u = z / softcap
    t = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - t) / (1.0 + t)
    return softcap * tl.where(u < 0, -th, th)


@triton.jit
def cap_slope(z, softcap):
    """d(softcap * tanh(z / softcap)) / dz = 1 - tanh(z / softcap)^2."""
    t = tl.exp(-2.0 * tl.abs(z / softcap))
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
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp, fp32 (the softcap is applied by callers)."""
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
    return acc * inv_temp

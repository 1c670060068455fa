"""Triton GPU backend: launches the kernels of :mod:`logo_kernels.triton_kernels`.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before
``logo_kernels`` is imported) — that is how the kernels are tested without a GPU. Tile sizes come from a
small heuristic: on a GPU 64 tokens x 128 vocabulary x 64 features per tile; under the interpreter,
whose cost grows with programs x loop iterations, the largest blocks the shape allows.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import GradsNeeded, Grads, LogitTransform


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'logo[triton]')"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def _pow2(x: int, low: int, high: int) -> int:
    p = 1 << max(0, (int(x) - 1).bit_length())
    return max(low, min(high, p))


@dataclass(frozen=True)
class Blocks:
    tokens: int
    vocab: int
    features: int


def choose_blocks(n: int, vocab: int, dim: int, chunk_size: Optional[int]) -> Blocks:
    """Tile sizes (powers of two >= 16, as tl.dot requires); ``chunk_size`` caps the token block."""
    if interpreting():
        blocks = Blocks(_pow2(n, 16, 128), _pow2(vocab, 16, 1024), _pow2(dim, 16, 128))
    else:
        blocks = Blocks(_pow2(n, 16, 64), _pow2(vocab, 16, 128), _pow2(dim, 16, 64))
    if chunk_size is not None:
        blocks = Blocks(_pow2(min(chunk_size, blocks.tokens), 16, blocks.tokens), blocks.vocab, blocks.features)
    return blocks


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32: exact (ieee) products, as torch's fp32 matmul; bf16: the interpreter's bf16 dot is wrong
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())



def _launch_grad_hidden(grad_logp, grad_lse, hidden, weight, bias, targets, lse, inv_temperature, softcap,
                        blocks: Blocks) -> torch.Tensor:
    from ..triton_kernels.backward import grad_hidden_kernel

    n, dim = hidden.shape
    grad = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return grad
    grad_hidden_kernel[(triton_cdiv(n, blocks.tokens),)](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logp,
        grad_lse if grad_lse is not None else grad_logp, grad, n, weight.shape[0], dim, hidden.stride(0),
        weight.stride(0), inv_temperature, softcap or 1.0, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        HAS_GLSE=grad_lse is not None, DOT_FP32=_dot_fp32(hidden.dtype), BLOCK_N=blocks.tokens,
        BLOCK_V=blocks.vocab, BLOCK_D=blocks.features)
    return grad


# The launches are custom operators, so torch.compile treats them as opaque calls (softcap 0 = none).
@torch.library.custom_op("logo_kernels::triton_linear_logprobs_fwd", mutates_args=())
def triton_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   inv_temperature: float, softcap: float, block_tokens: int, block_vocab: int, block_features: int,
                   with_basis: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [n] fp32, lse [n] fp32, basis [n, D] fp32 or [0])."""
    from ..triton_kernels.forward import forward_kernel

    n, dim = hidden.shape
    vocab = weight.shape[0]
    blocks = Blocks(block_tokens, block_vocab, block_features)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        forward_kernel[(triton_cdiv(n, blocks.tokens),)](
            hidden, weight, bias if bias is not None else hidden, targets, logp, lse, n, vocab, dim,
            hidden.stride(0), weight.stride(0), inv_temperature, softcap or 1.0, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap > 0, DOT_FP32=_dot_fp32(hidden.dtype), BLOCK_N=blocks.tokens,
            BLOCK_V=blocks.vocab, BLOCK_D=blocks.features)
    if not with_basis:
        return logp, lse, hidden.new_empty(0, dtype=torch.float32)
    # Q = (softmax * slope) @ W = temperature * dH for g_logp = 0, g_lse = 1
    basis = _launch_grad_hidden(torch.zeros_like(lse), torch.ones_like(lse), hidden, weight, bias, targets, lse,
                                inv_temperature, softcap, blocks)
    return logp, lse, basis.div_(inv_temperature) if inv_temperature != 1.0 else basis


@triton_forward.register_fake
def _(hidden, weight, bias, targets, inv_temperature, softcap, block_tokens, block_vocab, block_features, with_basis):
    n = hidden.shape[0]
    basis = hidden.new_empty((n, hidden.shape[1]) if with_basis else (0,), dtype=torch.float32)
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32), basis


@torch.library.custom_op("logo_kernels::triton_linear_logprobs_bwd", mutates_args=())
def triton_backward(grad_logp: torch.Tensor, grad_lse: Optional[torch.Tensor], hidden: torch.Tensor,
                    weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor,
                    inv_temperature: float, softcap: float, block_tokens: int, block_vocab: int, block_features: int,
                    need_hidden: bool, need_weight: bool, need_bias: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dH, dW, dBias) in the input dtypes; [0]-sized where not needed."""
    from ..triton_kernels.backward import grad_weight_kernel

    n, dim = hidden.shape
    vocab = weight.shape[0]
    blocks = Blocks(block_tokens, block_vocab, block_features)
    d_h, d_w, d_b = (hidden.new_empty(0) for _ in range(3))  # distinct: custom-op outputs may not alias
    if need_hidden:
        d_h = _launch_grad_hidden(grad_logp, grad_lse, hidden, weight, bias, targets, lse, inv_temperature, softcap,
                                  blocks).to(hidden.dtype)
    if need_weight or need_bias:
        dw32 = torch.zeros(vocab, dim, dtype=torch.float32, device=weight.device) if need_weight else lse
        db32 = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else lse
        if n > 0:
            grad_weight_kernel[(triton_cdiv(vocab, blocks.vocab),)](
                hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logp,
                grad_lse if grad_lse is not None else grad_logp, dw32, db32, n, vocab, dim, hidden.stride(0),
                weight.stride(0), inv_temperature, softcap or 1.0, HAS_BIAS=bias is not None,
                HAS_SOFTCAP=softcap > 0, HAS_GLSE=grad_lse is not None, NEED_DW=need_weight, NEED_DB=need_bias,
                DOT_FP32=_dot_fp32(hidden.dtype), BLOCK_N=blocks.tokens, BLOCK_V=blocks.vocab,
                BLOCK_D=blocks.features)
        d_w = dw32.to(weight.dtype) if need_weight else d_w
        d_b = db32.to(bias.dtype) if need_bias else d_b
    return d_h, d_w, d_b


@triton_backward.register_fake
def _(grad_logp, grad_lse, hidden, weight, bias, targets, lse, inv_temperature, softcap, block_tokens, block_vocab,
      block_features, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


class TritonBackend:
    name = "triton"

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, chunk_size: Optional[int],
                with_basis: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        blocks = choose_blocks(hidden.shape[0], weight.shape[0], hidden.shape[1], chunk_size)
        logp, lse, basis = triton_forward(hidden, weight, bias, targets, 1.0 / transform.temperature,
                                          transform.kernel_softcap, blocks.tokens, blocks.vocab, blocks.features,
                                          with_basis)
        return logp, lse, basis if with_basis else None

    def backward(self, grad_logp, grad_lse, hidden, weight, bias, targets, lse, transform: LogitTransform,
                 chunk_size: Optional[int], needed: GradsNeeded) -> Grads:
        blocks = choose_blocks(hidden.shape[0], weight.shape[0], hidden.shape[1], chunk_size)
        d_h, d_w, d_b = triton_backward(
            grad_logp.float().contiguous(), None if grad_lse is None else grad_lse.float().contiguous(), hidden,
            weight, bias, targets, lse, 1.0 / transform.temperature, transform.kernel_softcap, blocks.tokens,
            blocks.vocab, blocks.features, needed.hidden, needed.weight, needed.bias)
        return (d_h if needed.hidden else None, d_w if needed.weight else None, d_b if needed.bias else None)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

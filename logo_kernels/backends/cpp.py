"""C++ (OpenMP) CPU backend: thin wrapper over ``torch.ops.logo_kernels.linear_logprobs_{fwd,bwd}``.

The operators come from the optional extension ``logo_kernels._C`` (csrc/). Fake (meta) kernels are
registered here so torch.compile can trace through the ops without running them.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

from .base import GradsNeeded, Grads, LogitTransform

#: Token rows per tile GEMM (``chunk_size`` overrides it). One size for both passes: the backward then
#: recomputes bitwise the logits of the forward (same GEMM shapes), so softmax(x - lse) is exact where
#: it should be (e.g. exactly 1 for V = 1). 512 suits the backward's dW GEMM, which reduces over the
#: token block (~5% faster than 256 at D = 1024, V = 32000; the forward is indifferent).
DEFAULT_BLOCK_TOKENS = 512
#: Vocabulary rows per tile GEMM.
DEFAULT_BLOCK_VOCAB = 512
#: Budget of the per-thread fp32 [tokens, D] accumulators (dHidden in the backward, the gradient basis in
#: the forward), in bytes.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20

_LOAD_ERROR: Optional[str] = None
try:
    from logo_kernels import _C  # noqa: F401  (registers torch.ops.logo_kernels.*)
except ImportError as exc:  # extension not built: the dispatcher falls back to the torch backend
    if importlib.util.find_spec("logo_kernels._C") is None:
        _LOAD_ERROR = "logo_kernels._C was not built at install time (no C++ compiler, or LOGO_KERNELS_NO_EXT=1)"
    else:
        _LOAD_ERROR = f"logo_kernels._C failed to load: {type(exc).__name__}: {exc}"


def is_available() -> bool:
    return _LOAD_ERROR is None


def unavailable_reason() -> Optional[str]:
    return _LOAD_ERROR


if is_available():

    @torch.library.register_fake("logo_kernels::linear_logprobs_fwd")
    def _fwd_fake(hidden, weight, bias, targets, inv_temperature, softcap, block_tokens, block_vocab, with_basis,
                  workspace_bytes):
        n = hidden.shape[0]
        basis = hidden.new_empty((n, hidden.shape[1]) if with_basis else (0,), dtype=torch.float32)
        return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32), basis

    @torch.library.register_fake("logo_kernels::linear_logprobs_bwd")
    def _bwd_fake(grad_logp, grad_lse, hidden, weight, bias, targets, lse, inv_temperature, softcap,
                  block_tokens, block_vocab, need_hidden, need_weight, need_bias, workspace_bytes):
        return (
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0),
        )



class CppBackend:
    name = "cpp"

    def __init__(self, block_vocab: int = DEFAULT_BLOCK_VOCAB, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        self.block_vocab = block_vocab
        self.workspace_bytes = workspace_bytes

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, chunk_size: Optional[int],
                with_basis: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        logp, lse, basis = torch.ops.logo_kernels.linear_logprobs_fwd(
            hidden, weight, bias, targets, 1.0 / transform.temperature, transform.kernel_softcap,
            chunk_size or DEFAULT_BLOCK_TOKENS, self.block_vocab, with_basis, self.workspace_bytes,
        )
        return logp, lse, basis if with_basis else None

    def backward(self, grad_logp, grad_lse, hidden, weight, bias, targets, lse, transform: LogitTransform,
                 chunk_size: Optional[int], needed: GradsNeeded) -> Grads:
        grads = torch.ops.logo_kernels.linear_logprobs_bwd(
            grad_logp.float().contiguous(), None if grad_lse is None else grad_lse.float().contiguous(),
            hidden, weight, bias, targets, lse, 1.0 / transform.temperature, transform.kernel_softcap,
            chunk_size or DEFAULT_BLOCK_TOKENS, self.block_vocab,
            needed.hidden, needed.weight, needed.bias, self.workspace_bytes,
        )
        return tuple(g if want else None for g, want in zip(grads, (needed.hidden, needed.weight, needed.bias)))

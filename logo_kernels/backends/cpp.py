"""C++ (OpenMP) CPU backend: thin wrapper over ``torch.ops.logo_kernels.linear_logprobs_{fwd,bwd}``.

The operators come from the optional extension ``logo_kernels._C`` (csrc/). Fake (meta) kernels are
registered here so torch.compile can trace through the ops without running them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import FrozenSet, Optional

import torch

from .base import (FILTER_BLOCK, Filter, GradsNeeded, Grads, KernelOptions, LogitTransform, RowStats,
                   keep_mostly_live_tokens)

#: Token rows per tile GEMM (``chunk_size`` overrides it). One size for both passes: the backward then
#: recomputes bitwise the logits of the forward (same GEMM shapes), so softmax(x - lse) is exact where
#: it should be (e.g. exactly 1 for V = 1). 512 suits the backward's dW GEMM, which reduces over the
#: token block (~5% faster than 256 at D = 1024, V = 32000; the forward is indifferent).
DEFAULT_BLOCK_TOKENS = 512
#: Vocabulary rows per tile GEMM.
DEFAULT_BLOCK_VOCAB = 512
#: Vocabulary rows per tile of the filtered backward (a multiple of FILTER_BLOCK; its skipped pairs are zeroed).
#: 128 / 256 / 512 measured at N 2048, V 128256 (fp32, 2 cores, 2026-12-05): 256 cost what the exact backward costs
#: on Gaussian inputs, 128 a little more there and up to 5 % less on LM-like ones. Since a backward with every pair
#: live runs the exact walk (Gaussian inputs), 128: the published filtering figures (docs/filtering.md) use it.
FILTERED_BACKWARD_TILE = 128
#: Budget of the per-thread fp32 [tokens, D] accumulators (dHidden in the backward, the gradient basis in
#: the forward), in bytes.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20

REBUILD = ("rebuild it against this torch: pip install --no-build-isolation --no-deps --force-reinstall "
           "logo-kernels (from a checkout: make install)")


def built_torch_version(origin: Optional[str]) -> Optional[str]:
    """The torch ``_C`` was compiled against (``_C.torch-version`` beside it, written by setup.py), or None."""
    if origin is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(origin), "_C.torch-version"), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _release(version: str) -> str:
    return version.split("+")[0]


_UNSET = object()


def load_extension(running: str = torch.__version__, built=_UNSET) -> Optional[str]:
    """Imports ``logo_kernels._C`` (registering ``torch.ops.logo_kernels.*``) unless it was built for another torch;
    returns None when loaded, else why not. A library built against another torch release is not even opened
    (its C++ ABI may not match: an undefined symbol at best, a crash at worst). ``built`` overrides the recorded
    build version (tests)."""
    spec = importlib.util.find_spec("logo_kernels._C")
    if spec is None:
        return "logo_kernels._C was not built at install time (no C++ compiler, or LOGO_KERNELS_NO_EXT=1)"
    built = built_torch_version(spec.origin) if built is _UNSET else built
    if built is not None and _release(built) != _release(running):
        return f"logo_kernels._C was built for torch {built} but torch {running} is running; {REBUILD}"
    try:
        importlib.import_module("logo_kernels._C")
    except (ImportError, OSError) as exc:
        against = f"built for torch {built}, " if built else ""
        return (f"logo_kernels._C failed to load ({against}torch {running} running: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); {REBUILD}")
    return None


_LOAD_ERROR: Optional[str] = load_extension()


def is_available() -> bool:
    return _LOAD_ERROR is None


def unavailable_reason() -> Optional[str]:
    return _LOAD_ERROR


#: Set to 0 to make bf16 tiles multiply in fp32 (converted) even where the CPU has AVX512-BF16.
BF16_DOT_ENV = "LOGO_KERNELS_BF16_DOT"


def bf16_dot_enabled() -> bool:
    """Whether bf16 hidden states and heads multiply as bf16 here (vdpbf16ps: exact products, fp32 sums; csrc/bf16_dot.h)
    rather than converted to fp32: the CPU has AVX512-BF16 and ``LOGO_KERNELS_BF16_DOT`` is not 0."""
    return is_available() and bool(torch.ops.logo_kernels.bf16_dot_enabled())


if is_available():

    @torch.library.register_fake("logo_kernels::linear_logprobs_fwd")
    def _fwd_fake(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap, block_tokens, block_vocab,
                  with_basis, want_entropy, want_log_sum_sq, want_mean, want_top1, workspace_bytes, filter,
                  filter_block, log_filter_eps, max_skipped_mass, order):
        n = hidden.shape[0]
        row = lambda want, dtype=torch.float32: hidden.new_empty(n if want else 0, dtype=dtype)  # noqa: E731
        basis = hidden.new_empty((n, hidden.shape[1]) if with_basis else (0,), dtype=torch.float32)
        blocks = -(-weight.shape[0] // min(filter_block, block_vocab, weight.shape[0]))
        live = hidden.new_empty((n, blocks) if filter else (0,), dtype=torch.bool)
        return (row(True), row(True), basis, row(want_entropy), row(want_log_sum_sq), row(want_mean),
                row(want_top1, torch.bool), live)

    @torch.library.register_fake("logo_kernels::linear_logprobs_bwd")
    def _bwd_fake(grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy, logit_scale,
                  inv_temperature, softcap, block_tokens, block_vocab, need_hidden, need_weight, need_bias,
                  workspace_bytes, live, filter_block, order):
        return (
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0),
        )


class CppBackend:
    name = "cpp"
    label = "C++ extension"

    def __init__(self, block_vocab: int = DEFAULT_BLOCK_VOCAB, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        self.block_vocab = block_vocab
        self.workspace_bytes = workspace_bytes

    def missing_reason(self) -> Optional[str]:
        return _LOAD_ERROR

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> Optional[Exception]:
        if _LOAD_ERROR is not None:
            return RuntimeError(f"backend='cpp' requested but the C++ extension is not available: {_LOAD_ERROR}")
        if device.type != "cpu":
            return ValueError(f"backend='cpp' runs on CPU tensors only, got device {device}")
        if dtype == torch.float64:
            return TypeError("backend='cpp' accumulates in fp32 and takes float32/bfloat16/float16 inputs; "
                             "use backend='torch' for float64")
        return None

    def _block_vocab(self, filtering: Optional[Filter], backward: bool = False) -> int:
        """Vocabulary rows per tile: the filtered backward walks FILTERED_BACKWARD_TILE-wide tiles (a multiple of the
        filter's block), everything else ``block_vocab``."""
        return FILTERED_BACKWARD_TILE if filtering is not None and backward else self.block_vocab

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, options: KernelOptions,
                with_basis: bool = False, stats: FrozenSet[str] = frozenset(),
                filtering: Optional[Filter] = None) -> RowStats:
        logp, lse, basis, entropy, log_sum_sq, mean_logits, is_top1, live = torch.ops.logo_kernels.linear_logprobs_fwd(
            hidden, weight, bias, targets, transform.logit_scale, transform.inv_temperature, transform.kernel_softcap,
            options.chunk_size or DEFAULT_BLOCK_TOKENS, self._block_vocab(filtering), with_basis, "entropy" in stats,
            "log_sum_sq_probs" in stats, "mean_logits" in stats, "is_top1" in stats, self.workspace_bytes,
            filtering is not None, FILTER_BLOCK, filtering.log_eps if filtering is not None else 0.0,
            filtering.max_mass if filtering is not None else 0.0, filtering.order if filtering is not None else None,
        )
        pick = lambda x, name: x if name in stats else None  # noqa: E731
        live = keep_mostly_live_tokens(live) if filtering is not None else None  # the rule's last step (base.py)
        return RowStats(logp, lse, basis if with_basis else None, pick(entropy, "entropy"),
                        pick(log_sum_sq, "log_sum_sq_probs"), pick(mean_logits, "mean_logits"),
                        pick(is_top1, "is_top1"), live)

    def backward(self, grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                 transform: LogitTransform, options: KernelOptions, needed: GradsNeeded,
                 filtering: Optional[Filter] = None, live: Optional[torch.Tensor] = None) -> Grads:
        as_f32 = lambda x: None if x is None else x.float().contiguous()  # noqa: E731
        # nothing to skip: the exact walk (its wider tiles, no gathered rows) gives the same gradient
        filtering = filtering if live is not None and not bool(live.all()) else None
        grads = torch.ops.logo_kernels.linear_logprobs_bwd(
            as_f32(grad_logp), as_f32(grad_lse), as_f32(grad_entropy), hidden, weight, bias, targets, lse,
            as_f32(entropy) if grad_entropy is not None else None, transform.logit_scale,
            transform.inv_temperature, transform.kernel_softcap, options.chunk_size or DEFAULT_BLOCK_TOKENS,
            self._block_vocab(filtering, backward=True), needed.hidden, needed.weight, needed.bias, self.workspace_bytes,
            live if filtering is not None else None, FILTER_BLOCK, filtering.order if filtering is not None else None,
        )
        return tuple(g if want else None for g, want in zip(grads, (needed.hidden, needed.weight, needed.bias)))

"""Triton GPU backend: launches the kernels of :mod:`logo_kernels.triton_kernels`.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before
``logo_kernels`` is imported) — that is how the kernels are tested without a GPU. Tiles come from
:mod:`logo_kernels.triton_kernels.configs` (one table for sm_80 / sm_90 and bf16 / fp16 / fp32; timed by
``triton.autotune`` with ``LOGO_KERNELS_AUTOTUNE=1``); under the interpreter, whose cost grows with programs x
loop iterations, the largest blocks the shape allows. ``chunk_size`` caps the token block.

The backward has two schedules (``KernelOptions.deterministic``): owned rows, no atomics, the logits recomputed
twice (default); or one recomputation with fp32 atomic adds (8 instead of 10 N·V·D FLOPs per forward+backward).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import FrozenSet, Optional

import torch

from .base import Filter, GradsNeeded, Grads, KernelOptions, LogitTransform, RowStats, live_pairs

AUTOTUNE_ENV = "LOGO_KERNELS_AUTOTUNE"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'logo-kernels[triton]')"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _tile_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype whose tile table applies: fp32 when the operands differ (they are multiplied in fp32)."""
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32


def _dot_fp32(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    # fp32 (or mixed dtypes): exact (ieee) fp32 products, as torch's fp32 matmul; bf16: the interpreter's bf16 dot
    # is wrong
    if hidden_dtype != weight_dtype or hidden_dtype == torch.float32:
        return True
    return hidden_dtype == torch.bfloat16 and interpreting()


def _autotune() -> bool:
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, dtype_name: str, reset: tuple):
    """``triton.autotune`` over the config table, keyed on the shape (N in power-of-two buckets)."""
    import triton

    from ..triton_kernels import backward, forward
    from ..triton_kernels.configs import GPU_CONFIGS

    fn = {"forward": forward.forward_kernel, "grad_hidden": backward.grad_hidden_kernel,
          "grad_weight": backward.grad_weight_kernel, "grad_fused": backward.grad_fused_kernel}[kernel_name]
    configs = [triton.Config(c.as_dict() | ({"GROUP_N": c.group_n} if kernel_name == "grad_fused" else {}),
                             num_warps=c.num_warps, num_stages=c.num_stages)
               for c in GPU_CONFIGS[(kernel_name, dtype_name)]]
    return triton.autotune(configs, key=["N_BUCKET", "V", "D"], reset_to_zero=list(reset))(fn)


def _blocks(kernel_name: str, dtype: torch.dtype, n: int, vocab: int, dim: int, chunk_size: Optional[int]):
    """(block sizes, config) of ``kernel_name`` from the config table (or the interpreter's), without autotuning."""
    from ..triton_kernels.configs import _pow2, default_config, interpreter_blocks, shrink_to_shape

    config = interpreter_blocks(n, vocab, dim) if interpreting() else \
        shrink_to_shape(default_config(kernel_name, _dtype_name(dtype)), n, vocab, dim)
    blocks = config.as_dict()
    if chunk_size is not None:
        blocks["BLOCK_N"] = _pow2(min(chunk_size, blocks["BLOCK_N"]), 16, blocks["BLOCK_N"])
    return blocks, config


def _launch(kernel_name: str, fn, grid, args: dict, constexprs: dict, dtype: torch.dtype, n: int, vocab: int,
            dim: int, chunk_size: Optional[int], reset: tuple = (), tune: bool = True) -> None:
    """Launches ``fn`` with the tiles of the config table (or autotuned unless ``tune`` is False, or the
    interpreter's); ``grid(meta)`` maps the block sizes to the grid."""
    args = dict(args, N_BUCKET=1 << max(0, n - 1).bit_length())
    if tune and _autotune() and chunk_size is None:
        _tuned(kernel_name, _dtype_name(dtype), reset)[grid](**args, **constexprs)
        return
    blocks, config = _blocks(kernel_name, dtype, n, vocab, dim, chunk_size)
    if kernel_name == "grad_fused":
        blocks["GROUP_N"] = config.group_n
    launch_options = {} if interpreting() else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    fn[grid(blocks)](**args, **constexprs, **blocks, **launch_options)


def filter_block(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: Optional[int]) -> int:
    """The vocabulary block of the live flags: the forward's BLOCK_V (a filtered forward is never autotuned)."""
    n, dim = hidden.shape
    return _blocks("forward", _tile_dtype(hidden, weight), n, weight.shape[0], dim, chunk_size)[0]["BLOCK_V"]


def _filter_args(order: Optional[torch.Tensor], live: Optional[torch.Tensor], live_block: int, fallback):
    """Kernel arguments of gradient filtering (dummies when off)."""
    return dict(order_ptr=order if order is not None else fallback, live_ptr=live if live is not None else fallback,
                live_block=live_block, num_live_blocks=live.shape[1] if live is not None else 1)


def _common_args(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap):
    n, dim = hidden.shape
    return dict(h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else hidden, t_ptr=targets, N=n,
                V=weight.shape[0], D=dim, stride_h=hidden.stride(0), stride_w=weight.stride(0),
                logit_scale=logit_scale, inv_temp=inv_temperature, softcap=softcap or 1.0)


def _common_flags(hidden, weight, bias, softcap):
    return dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, DOT_FP32=_dot_fp32(hidden.dtype, weight.dtype))


def _launch_grad_hidden(grad_logp, grad_lse, grad_entropy, entropy, hidden, weight, bias, targets, lse, logit_scale,
                        inv_temperature, softcap, chunk_size, order=None, live=None, live_block=1) -> torch.Tensor:
    from ..triton_kernels.backward import grad_hidden_kernel

    n, dim = hidden.shape
    grad = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return grad
    args = _common_args(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap)
    args.update(lse_ptr=lse, g_ptr=grad_logp, glse_ptr=grad_lse if grad_lse is not None else grad_logp,
                gent_ptr=grad_entropy if grad_entropy is not None else grad_logp,
                ent_ptr=entropy if grad_entropy is not None else grad_logp, dh_ptr=grad,
                **_filter_args(order, live, live_block, targets))
    flags = dict(_common_flags(hidden, weight, bias, softcap), HAS_GLSE=grad_lse is not None,
                 HAS_ENT=grad_entropy is not None, FILTER=live is not None)
    _launch("grad_hidden", grad_hidden_kernel, lambda meta: (triton_cdiv(n, meta["BLOCK_N"]),), args, flags,
            _tile_dtype(hidden, weight), n, weight.shape[0], dim, chunk_size, reset=("dh_ptr",))
    return grad


# The launches are custom operators, so torch.compile treats them as opaque calls (softcap 0 = none).
@torch.library.custom_op("logo_kernels::triton_linear_logprobs_fwd", mutates_args=())
def triton_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   logit_scale: float, inv_temperature: float, softcap: float, chunk_size: int, with_basis: bool,
                   want_entropy: bool, want_log_sum_sq: bool, want_mean: bool, want_top1: bool, filter: bool,
                   log_filter_eps: float, max_skipped_mass: float, order: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor]:
    """-> (logp, lse, basis [n, D] or [0], entropy, log_sum_sq_probs, mean_logits, is_top1 (bool), live), [0] where
    not asked for. ``chunk_size`` 0 = the table's token block. With ``filter``: live [n, cdiv(V, filter_block)] int8,
    the (token, block of the walk ``order``) pairs the backward visits (:func:`base.live_pairs`)."""
    from ..triton_kernels.forward import forward_kernel

    n, dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    row = lambda want: torch.empty(n if want else 0, **f32)  # noqa: E731
    logp, lse = row(True), row(True)
    entropy, log_sum_sq, mean_logits = row(want_entropy), row(want_log_sum_sq), row(want_mean)
    top1 = torch.empty(n if want_top1 else 0, dtype=torch.int8, device=hidden.device)
    chunk = chunk_size or None
    block = filter_block(hidden, weight, chunk) if filter else 1
    if filter and order is None:  # the identity walk (the kernels read ids through the order)
        order = torch.arange(vocab, device=hidden.device)
    tile_max = torch.empty((n, triton_cdiv(vocab, block)) if filter else (0,), **f32)
    tile_lse = torch.empty_like(tile_max)
    if n > 0:
        args = _common_args(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap)
        args.update(logp_ptr=logp, lse_ptr=lse, ent_ptr=entropy if want_entropy else lse,
                    lsq_ptr=log_sum_sq if want_log_sum_sq else lse, mean_ptr=mean_logits if want_mean else lse,
                    top1_ptr=top1 if want_top1 else targets, order_ptr=order if order is not None else targets,
                    tmax_ptr=tile_max if filter else lse, tlse_ptr=tile_lse if filter else lse)
        flags = dict(_common_flags(hidden, weight, bias, softcap), WANT_ENTROPY=want_entropy, WANT_LSQ=want_log_sum_sq,
                     WANT_MEAN=want_mean, WANT_TOP1=want_top1, FILTER=filter)
        _launch("forward", forward_kernel, lambda meta: (triton_cdiv(n, meta["BLOCK_N"]),), args, flags,
                _tile_dtype(hidden, weight), n, vocab, dim, chunk, tune=not filter)
    live = torch.empty(0, dtype=torch.int8, device=hidden.device)
    if filter:  # the [n, blocks] fp32 statistics become int8 flags
        position = targets if order is None else torch.argsort(order).index_select(0, targets)
        live = live_pairs(tile_max, tile_lse, lse, position // block, log_filter_eps, max_skipped_mass).to(torch.int8)
        del tile_max, tile_lse
    basis = hidden.new_empty(0, dtype=torch.float32)
    if with_basis:  # Q = (softmax * slope) @ W = dH / chain for g_logp = 0, g_lse = 1
        basis = _launch_grad_hidden(torch.zeros_like(lse), torch.ones_like(lse), None, None, hidden, weight, bias,
                                    targets, lse, logit_scale, inv_temperature, softcap, chunk)
        chain = logit_scale * inv_temperature
        if chain != 1.0:
            basis.div_(chain)
    return logp, lse, basis, entropy, log_sum_sq, mean_logits, top1.view(torch.bool), live


@triton_forward.register_fake
def _(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap, chunk_size, with_basis, want_entropy,
      want_log_sum_sq, want_mean, want_top1, filter, log_filter_eps, max_skipped_mass, order):
    n = hidden.shape[0]
    row = lambda want, dtype=torch.float32: hidden.new_empty(n if want else 0, dtype=dtype)  # noqa: E731
    basis = hidden.new_empty((n, hidden.shape[1]) if with_basis else (0,), dtype=torch.float32)
    # the width of the live flags only when filtering (filter_block fixes the shape: no dynamic N otherwise)
    live = hidden.new_empty((n, triton_cdiv(weight.shape[0], filter_block(hidden, weight, chunk_size or None)))
                            if filter else (0,), dtype=torch.int8)
    return (row(True), row(True), basis, row(want_entropy), row(want_log_sum_sq), row(want_mean),
            row(want_top1, torch.bool), live)


@torch.library.custom_op("logo_kernels::triton_linear_logprobs_bwd", mutates_args=())
def triton_backward(grad_logp: torch.Tensor, grad_lse: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                    lse: torch.Tensor, entropy: Optional[torch.Tensor], logit_scale: float, inv_temperature: float,
                    softcap: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                    deterministic: bool, live: Optional[torch.Tensor], order: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dH, dW, dBias) in the input dtypes; [0]-sized where not needed. With the forward's ``live`` flags (and
    ``order``) the tiles without a live pair are skipped."""
    from ..triton_kernels.backward import grad_fused_kernel, grad_weight_kernel

    n, dim = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk_size or None
    d_h, d_w, d_b = (hidden.new_empty(0) for _ in range(3))  # distinct: custom-op outputs may not alias
    need_w_or_b = need_weight or need_bias
    dw32 = torch.zeros(vocab, dim, dtype=torch.float32, device=weight.device) if need_weight else lse
    db32 = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else lse
    coefficient_args = dict(lse_ptr=lse, g_ptr=grad_logp, glse_ptr=grad_lse if grad_lse is not None else grad_logp,
                            gent_ptr=grad_entropy if grad_entropy is not None else grad_logp,
                            ent_ptr=entropy if grad_entropy is not None else grad_logp)
    flags = dict(_common_flags(hidden, weight, bias, softcap), HAS_GLSE=grad_lse is not None,
                 HAS_ENT=grad_entropy is not None, FILTER=live is not None)
    live_block = filter_block(hidden, weight, chunk) if live is not None else 1
    if live is not None and order is None:
        order = torch.arange(vocab, device=hidden.device)
    filter_args = _filter_args(order, live, live_block, targets)
    if not deterministic and n > 0:
        dh32 = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device) if need_hidden else lse
        args = _common_args(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap)
        args.update(coefficient_args, dh_ptr=dh32, dw_ptr=dw32, db_ptr=db32, **filter_args)
        grid = lambda meta: (triton_cdiv(n, meta["BLOCK_N"]) * triton_cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
        _launch("grad_fused", grad_fused_kernel, grid, args,
                dict(flags, NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias), _tile_dtype(hidden, weight), n,
                vocab, dim, chunk, reset=("dh_ptr", "dw_ptr", "db_ptr"))
        if need_hidden:
            d_h = dh32.to(hidden.dtype)
    else:
        if need_hidden:
            d_h = _launch_grad_hidden(grad_logp, grad_lse, grad_entropy, entropy, hidden, weight, bias, targets, lse,
                                      logit_scale, inv_temperature, softcap, chunk, order, live,
                                      live_block).to(hidden.dtype)
        if need_w_or_b and n > 0:
            args = _common_args(hidden, weight, bias, targets, logit_scale, inv_temperature, softcap)
            args.update(coefficient_args, dw_ptr=dw32, db_ptr=db32, **filter_args)
            _launch("grad_weight", grad_weight_kernel, lambda meta: (triton_cdiv(vocab, meta["BLOCK_V"]),), args,
                    dict(flags, NEED_DW=need_weight, NEED_DB=need_bias), _tile_dtype(hidden, weight), n, vocab, dim,
                    chunk, reset=("dw_ptr", "db_ptr"))
    if need_weight:
        d_w = dw32.to(weight.dtype)
    if need_bias:
        d_b = db32.to(bias.dtype)
    return d_h, d_w, d_b


@triton_backward.register_fake
def _(grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy, logit_scale, inv_temperature,
      softcap, chunk_size, need_hidden, need_weight, need_bias, deterministic, live, order):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


class TritonBackend:
    name = "triton"
    label = "Triton"

    def missing_reason(self) -> Optional[str]:
        return unavailable_reason()

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> Optional[Exception]:
        reason = unavailable_reason()
        if reason is not None:
            return RuntimeError(f"backend='triton' requested but {reason}")
        if device.type == "cpu" and not interpreting():
            return ValueError("backend='triton' runs on CUDA tensors (on CPU tensors only under Triton's interpreter: "
                              "set TRITON_INTERPRET=1 before importing logo_kernels)")
        if device.type not in ("cpu", "cuda"):
            return ValueError(f"backend='triton' runs on CUDA tensors, got device {device}")
        if dtype == torch.float64:
            return TypeError("backend='triton' takes float32/bfloat16/float16 inputs; use backend='torch' for float64")
        return None

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, options: KernelOptions,
                with_basis: bool = False, stats: FrozenSet[str] = frozenset(),
                filtering: Optional[Filter] = None) -> RowStats:
        logp, lse, basis, entropy, log_sum_sq, mean_logits, is_top1, live = triton_forward(
            hidden, weight, bias, targets, transform.logit_scale, transform.inv_temperature, transform.kernel_softcap,
            options.chunk_size or 0, with_basis, "entropy" in stats, "log_sum_sq_probs" in stats,
            "mean_logits" in stats, "is_top1" in stats, filtering is not None,
            filtering.log_eps if filtering is not None else 0.0, filtering.max_mass if filtering is not None else 0.0,
            filtering.order if filtering is not None else None)
        pick = lambda x, name: x if name in stats else None  # noqa: E731
        return RowStats(logp, lse, basis if with_basis else None, pick(entropy, "entropy"),
                        pick(log_sum_sq, "log_sum_sq_probs"), pick(mean_logits, "mean_logits"),
                        pick(is_top1, "is_top1"), live if filtering is not None else None)

    def backward(self, grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                 transform: LogitTransform, options: KernelOptions, needed: GradsNeeded,
                 filtering: Optional[Filter] = None, live: Optional[torch.Tensor] = None) -> Grads:
        as_f32 = lambda x: None if x is None else x.float().contiguous()  # noqa: E731
        filtering = filtering if live is not None else None
        d_h, d_w, d_b = triton_backward(
            as_f32(grad_logp), as_f32(grad_lse), as_f32(grad_entropy), hidden, weight, bias, targets, lse,
            as_f32(entropy) if grad_entropy is not None else None, transform.logit_scale, transform.inv_temperature,
            transform.kernel_softcap, options.chunk_size or 0, needed.hidden, needed.weight, needed.bias,
            options.deterministic, live if filtering is not None else None,
            filtering.order if filtering is not None else None)
        return (d_h if needed.hidden else None, d_w if needed.weight else None, d_b if needed.bias else None)

"""``linear_logprobs``: per-token log-probabilities of targets straight from hidden states and the LM head.

The [tokens x vocab] logits are never materialised: a backend computes them tile by tile, keeps only the
per-token statistics (log-sum-exp, and on request entropy, log sum p^2, mean logit, top-1), and recomputes
the tiles in the backward.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _zero3
from ._validation import (canonical_targets, check_filter_eps, check_finite_inputs, check_finite_lse,
                          check_ignore_index, check_linear_inputs, check_outputs, check_target_range, check_transform)
from .backends import Backend, Filter, GradsNeeded, KernelOptions, LogitTransform, mean_logit_order, resolve_backend

#: Environment default of ``deterministic`` (the Triton backward without atomics); "0" selects the faster one.
DETERMINISTIC_ENV = "LOGO_KERNELS_DETERMINISTIC"


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`linear_logprobs` with ``outputs=(...)``; fields not asked for are None.

    logp, lse, entropy (of softmax of the transformed logits) are float32 and differentiable (gradients of
    all three compose); log_sum_sq_probs = log sum_v p_v^2, mean_logits (over the vocabulary, transformed)
    float32 and is_top1 (the target is the first arg-max) bool are not differentiable. All are 0 / False at
    ignored targets.
    """

    logp: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


def _target_slopes(hidden, target_rows, bias, targets, transform: LogitTransform) -> Optional[torch.Tensor]:
    """The softcap slope at each target logit, from its pre-cap value (fp32 [n]); None without a softcap."""
    if transform.softcap is None:
        return None
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = (hidden.to(acc) * target_rows.to(acc)).sum(dim=1)
    if bias is not None:
        z = z + bias.index_select(0, targets).to(acc)
    return transform.slope_of_pre_cap(transform.pre_cap(z))


def _grad_hidden_from_basis(grad_logp, grad_lse, target_rows, target_slopes, basis,
                            transform: LogitTransform) -> torch.Tensor:
    """dHidden of a frozen head without a GEMM: (g * slope_t * W[t] + (g_lse - g) * Q) * chain.

    From dL/dx = g * onehot + (g_lse - g) * softmax, times the softcap slope and logit_scale / temperature,
    and dH = dL/dz @ W, with Q = (softmax * slope) @ W computed by the forward and target_rows = W[t] and the
    target slopes saved by it (1 without softcap).
    """
    acc = basis.dtype
    g = grad_logp.to(acc)
    coef_basis = -g if grad_lse is None else grad_lse.to(acc) - g
    coef_target = g if target_slopes is None else g * target_slopes.to(acc)
    d_h = torch.addcmul(coef_basis[:, None] * basis, coef_target[:, None], target_rows.to(acc))
    return d_h * transform.chain if transform.chain != 1.0 else d_h


def _no_autocast(device: torch.device):
    """The op computes in the dtypes of its inputs with fp32 accumulation, whatever autocast says around it."""
    if device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


_SECOND_ORDER = ("linear_logprobs is differentiable once: its gradients carry no graph, so double backward "
                 "(create_graph=True, gradient penalties) through it is not supported")


def _first_order_only(backward):
    """Like torch's ``once_differentiable``, but the gradients it returns under ``create_graph=True`` always carry
    a node that raises :data:`_SECOND_ORDER` when differentiated — even when nothing upstream requires grad (where
    ``once_differentiable`` returns plain tensors and the user gets an unrelated "does not require grad")."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
        if not tensors:
            return outputs
        guarded = torch._C._functions.DelayedError(_SECOND_ORDER, len(tensors))(
            *[outputs[i].detach().requires_grad_() for i in tensors])
        outputs = list(outputs)
        for i, value in zip(tensors, guarded if isinstance(guarded, tuple) else (guarded,)):
            outputs[i] = value
        return tuple(outputs)

    return wrapper


_STAT_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class _LinearLogprobs(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 -> (logp, lse, entropy, log_sum_sq_probs,
    mean_logits, is_top1) [N] (None where not requested).

    Rows whose target is ``ignore_index`` are compacted away before the backend runs and get 0 in every output;
    their gradients are 0. When only ``hidden`` needs a gradient (a frozen LM head, as under LoRA) the forward
    also computes the gradient basis Q [n, D] fp32 and keeps the target rows W[t], so that the backward of logp
    and lse is elementwise and reads neither the weight nor hidden: two GEMMs' worth of work in all instead of
    three. An entropy gradient needs the logits again: it takes the recomputing backward (the basis would need a
    second [n, D] accumulator and a third GEMM in the forward, costing what the recomputation costs).
    Under ZeRO-3 the head is gathered in the forward and again in a recomputing backward.
    With ``filter_eps`` the vocabulary order (by mean logit) is computed before the backend's forward, which
    returns what its recomputing backward may skip (the frozen head's elementwise backward is exact anyway).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, transform: LogitTransform,
                backend: Backend, options: KernelOptions, stats: frozenset, filter_eps: Optional[float]):
        n = hidden.shape[0]
        kept = (targets != ignore_index).nonzero().squeeze(1)
        compact = kept.numel() != n
        h = hidden.index_select(0, kept) if compact else hidden
        t = targets.index_select(0, kept) if compact else targets
        frozen_head = (ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                       and not (bias is not None and ctx.needs_input_grad[2]))
        recomputes = not frozen_head or "entropy" in stats
        with _zero3.gathered(weight, bias), _no_autocast(hidden.device):
            filtering = None
            differentiable = any(ctx.needs_input_grad[:3])  # no gradient (no_grad, a reference model): no filter
            if filter_eps is not None and recomputes and differentiable and h.shape[0] > 0:
                filtering = Filter(filter_eps, mean_logit_order(h, weight, bias))
            rows = backend.forward(h.contiguous(), weight.contiguous(), bias, t.contiguous(), transform, options,
                                   with_basis=frozen_head, stats=stats, filtering=filtering)
            check_finite_lse(rows.lse, kept)
            target_rows = weight.index_select(0, t) if frozen_head else None
            target_slopes = _target_slopes(h, target_rows, bias, t, transform) if frozen_head else None

        def scatter(x):  # ignored rows get 0; saved tensors are never handed out (in-place edits cannot corrupt them)
            if x is None:
                return None
            return x.new_zeros(n).index_copy_(0, kept, x) if compact else x.clone()

        outputs = tuple(scatter(x) for x in (rows.logp, rows.lse) + tuple(getattr(rows, f) for f in _STAT_FIELDS))

        # the recomputing backward reads hidden and weight: saved unless the frozen head's entropy-free path suffices
        keep_inputs = not frozen_head or "entropy" in stats
        partitioned = _zero3.is_partitioned(weight) or _zero3.is_partitioned(bias)
        saved_weight, saved_bias = (weight, bias) if keep_inputs and not partitioned else (None, None)
        ctx.save_for_backward(hidden if keep_inputs else None, saved_weight, saved_bias, t, kept, rows.lse,
                              rows.entropy, rows.basis, target_rows, target_slopes, rows.live,
                              None if filtering is None else filtering.order)
        ctx.filter_eps = None if filtering is None else filtering.eps
        ctx.partitioned_head = (weight, bias) if keep_inputs and partitioned else None  # parameters, not activations
        ctx.hidden_meta = (hidden.shape, hidden.dtype, hidden.device)
        ctx.has_bias = bias is not None
        ctx.compact = compact
        ctx.transform, ctx.backend, ctx.options = transform, backend, options
        ctx.mark_non_differentiable(*(x for x in outputs[3:] if x is not None))
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_logp, grad_lse, grad_entropy, *_not_differentiable):
        (hidden, weight, bias, t, kept, lse_kept, entropy_kept, basis, target_rows, target_slopes, live,
         order) = ctx.saved_tensors
        filtering = None if ctx.filter_eps is None else Filter(ctx.filter_eps, order)
        if ctx.partitioned_head is not None:
            weight, bias = ctx.partitioned_head
        needed = GradsNeeded(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                             ctx.has_bias and ctx.needs_input_grad[2])
        hidden_shape, hidden_dtype, device = ctx.hidden_meta
        grads_in = (grad_logp, grad_lse, grad_entropy)
        if not needed.any or all(g is None for g in grads_in):
            return (None,) * 10  # None: a zero gradient

        select = (lambda x: x.index_select(0, kept)) if ctx.compact else (lambda x: x)  # noqa: E731
        g_logp = torch.zeros_like(lse_kept) if grad_logp is None else select(grad_logp).float().contiguous()
        g_lse = None if grad_lse is None else select(grad_lse).float().contiguous()
        g_entropy = None if grad_entropy is None else select(grad_entropy).float().contiguous()

        if basis is not None and g_entropy is None:  # frozen head: elementwise, no recomputation
            d_h, d_w, d_b = _grad_hidden_from_basis(g_logp, g_lse, target_rows, target_slopes, basis,
                                                    ctx.transform).to(hidden_dtype), None, None
        else:
            with _zero3.gathered(weight, bias), _no_autocast(device):
                d_h, d_w, d_b = ctx.backend.backward(
                    g_logp, g_lse, g_entropy, select(hidden).contiguous(), weight.contiguous(), bias,
                    t.contiguous(), lse_kept, entropy_kept, ctx.transform, ctx.options, needed, filtering=filtering,
                    live=live)
        if d_h is not None and ctx.compact:
            d_h = torch.zeros(hidden_shape, dtype=hidden_dtype, device=device).index_copy_(0, kept, d_h)
        return (d_h, d_w, d_b) + (None,) * 7


def _deterministic_default() -> bool:
    return os.environ.get(DETERMINISTIC_ENV, "1").strip().lower() not in ("0", "false", "no")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    return_lse: bool = False,
    outputs: Optional[Sequence[str]] = None,
    deterministic: Optional[bool] = None,
    filter_eps: Union[None, float, str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], TokenStats]:
    """Log-probability of each target token under ``softmax(x)``, fused, with
    ``x = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``.

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 (float64 with backend "torch", for gradcheck); finite.
            ``hidden[..., t, :]`` predicts ``targets[..., t]`` (shift before calling).
        weight: [V, D] (the LM head), finite; the dtype of ``hidden``, or another of fp32 / bf16 / fp16 (mixed
            inputs are multiplied in fp32, without a copy of the head). A DeepSpeed ZeRO-3 partitioned parameter is
            gathered for the forward and for a recomputing backward.
        targets: [...] integer class ids (any integer dtype) in [0, V), or ``ignore_index``.
        bias: optional [V], same dtype as ``weight``; may hold -inf (masked tokens), not NaN / +inf.
        ignore_index: targets equal to it get 0 in every output and zero gradient; they cost no compute.
        temperature: logits are divided by it (after the softcap, as sampling does).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2/3's final softcap).
        logit_scale: multiplies the logits before the softcap (Cohere, Granite, ... ``config.logit_scale``).
        backend: "auto" (CUDA -> Triton, CPU -> C++ when built, else chunked torch), "torch", "cpp", "triton".
        chunk_size: tokens per chunk / tile; None picks one that bounds working memory.
        return_lse: (with ``outputs=None``) also return the log-sum-exp of the transformed logits.
        outputs: None (the classic return), or names from ``("logp", "lse", "entropy", "log_sum_sq_probs",
            "mean_logits", "is_top1")``: returns a :class:`TokenStats` with those fields set.
        deterministic: Triton backward without atomics (default: env ``LOGO_KERNELS_DETERMINISTIC``, else True);
            the other backends are always deterministic.
        filter_eps: gradient filtering (docs/filtering.md). None (default): exact gradients. A float in (0, 2^-7],
            or "auto" (finfo(dtype).eps / 32 of the least precise of hidden and weight: 2^-12 bf16, 2^-15 fp16,
            2^-28 fp32): the recomputing backward skips (token, vocabulary block) pairs whose probabilities all lie
            below it and that do not hold the target, the least probable first, at most 16 * filter_eps of each
            token's probability mass. A skipped dL/dlogit entry is at most
            ``filter_eps * (|g_lse - g - g_H H| + |g_H| ln(1/filter_eps)) * logit_scale / temperature`` (g, g_lse,
            g_H: the upstream gradients of logp, lse, entropy); the per-token bound is in docs/filtering.md. The
            forward outputs are unchanged (up to summation order).

    Returns:
        float32 [...] log-probs (float64 for float64 inputs); with ``return_lse`` a pair (logp, lse); with
        ``outputs`` a :class:`TokenStats`. Differentiable w.r.t. hidden, weight and bias for any upstream gradient
        of logp, lse and entropy (once: double backward raises); gradients come back in the input dtypes,
        accumulated in fp32.

    Raises:
        TypeError / ValueError naming the argument (and position) at fault; FloatingPointError if finite
        inputs overflow float32 logits. See :mod:`logo_kernels._validation` for the non-finite policy.
    """
    with _zero3.gathered(weight, bias):  # a ZeRO-3 partitioned head holds no data outside its module's forward
        return _linear_logprobs(hidden, weight, targets, bias, ignore_index, temperature, softcap, logit_scale,
                                backend, chunk_size, return_lse, outputs, deterministic, filter_eps)


def _linear_logprobs(hidden, weight, targets, bias, ignore_index, temperature, softcap, logit_scale, backend,
                     chunk_size, return_lse, outputs, deterministic, filter_eps):
    check_linear_inputs(hidden, weight, targets, bias)
    check_transform(temperature, softcap, logit_scale)
    ignore_index = check_ignore_index(ignore_index)
    wanted = check_outputs(outputs)
    if wanted is not None and return_lse:
        raise TypeError("return_lse applies to outputs=None only; ask for outputs=('logp', 'lse') instead")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None or a bool, got {deterministic!r}")
    filter_eps = check_filter_eps(filter_eps, hidden.dtype, weight.dtype)
    targets = canonical_targets(targets)
    check_target_range(targets, weight.shape[0], ignore_index)
    check_finite_inputs(hidden, weight, bias)
    impl = resolve_backend(backend, hidden.device, hidden.dtype)

    lead_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    transform = LogitTransform(float(temperature), None if softcap is None else float(softcap), float(logit_scale))
    options = KernelOptions(chunk_size, _deterministic_default() if deterministic is None else deterministic)
    stats = frozenset(wanted or ()) & frozenset(_STAT_FIELDS)
    results = _LinearLogprobs.apply(flat_hidden, weight, bias, targets.reshape(-1), ignore_index, transform, impl,
                                    options, stats, filter_eps)
    results = [None if x is None else x.view(lead_shape) for x in results]
    if wanted is None:
        return (results[0], results[1]) if return_lse else results[0]
    return TokenStats(**{name: value for name, value in zip(TokenStats._fields, results) if name in wanted})

"""Shared-prefix attention for packed rows ``[prefix | response_0 | ... | response_M | padding]``.

Prefix tokens attend causally within the prefix; the tokens of a response attend to the prefix and causally
to their own response, never to another response; padding attends to nothing and outputs 0. Each response
sees exactly what it would see run alone as ``[prefix | response]`` under the model's own attention: the
layer's sliding window (counted in that sequence), attention softcap, attention sinks, scaling and grouped
key/value heads (:mod:`logo.attention.features` reads them, or refuses what it cannot honour).

Paths (``backend``):

* ``exact`` (the default everywhere): the prefix of a plain layer (no softcap, no sinks, no window shorter
  than the row) is one flash call — on CPU :func:`logo.attention.merged.causal_prefix` (its backward folds query
  groups into the batch), on CUDA ``scaled_dot_product_attention`` with ``enable_gqa`` — and on CPU its responses
  are two flash calls each, merged exactly (:mod:`logo.attention.merged`); otherwise the
  responses — and the whole row of any other layer — run :func:`logo.attention.exact.segment_attention`:
  queries in chunks of bounded scores, the prefix keys read in place (no per-response copy, no key/value head
  expanded to the query heads), recomputed in the backward.
* ``flex`` (opt-in, CUDA): one FlexAttention kernel per layer with a block mask built from the row layouts,
  softcap as a score mod, windows in the mask, GQA native (:mod:`logo.attention.flex`). Sinks fall back to
  ``exact``. FlexAttention has no backward on CPU; it becomes the CUDA default once the gpu-marked
  equivalence tests have passed on a GPU.

Registered with transformers' AttentionInterface as ``"logo_shared_prefix"``: a model set to it reads
``shared_prefix_layouts=`` (the ``layouts`` of a :class:`logo.data.packing.PackedBatch`) among the forward's
keyword arguments. Without it the call is ordinary causal attention with the same features (and the padding
mask and KV cache honoured), so the same model still evaluates and generates plain sequences.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from logo_kernels.integrations.hf import unwrap_causal_lm

from . import merged
from .exact import KeyBlock, Segment, segment_attention
from .features import AttentionFeatures, family, read_features

ATTENTION_NAME = "logo_shared_prefix"
BACKENDS = ("exact", "flex")


@dataclass
class Settings:
    """Process-wide choices of the attention (set by :func:`enable_shared_prefix_attention`)."""

    backend: str = os.environ.get("LOGO_ATTENTION_BACKEND", "exact")
    chunk_elements: int = int(os.environ.get("LOGO_ATTENTION_CHUNK_ELEMENTS", 1 << 22))
    head_slice: Optional[tuple] = None  # (rank, size) under Ulysses sequence parallelism


settings = Settings()


def set_head_slice(rank: int, size: int) -> None:
    """Under Ulysses sequence parallelism with ``size`` ranks, rank ``rank`` attends with the ``rank``-th P-th of
    the query heads: per-head parameters the attention receives whole (sinks) are sliced to it."""
    settings.head_slice = None if size == 1 else (rank, size)


def _row_segments(prefix: int, responses: Sequence[int], whole_row: bool):
    """The segments of a packed row: the prefix (when ``whole_row``) and each response."""
    segments = [Segment(0, prefix, 0, (KeyBlock(0, prefix, 0),))] if whole_row else []
    start = prefix
    for n in responses:
        segments.append(Segment(start, start + n, prefix, (KeyBlock(0, prefix, 0), KeyBlock(start, start + n, prefix))))
        start += n
    return segments


def _sdpa_causal(q, k, v, scale):
    """Plain causal attention of [B, H, Lq, d] queries against [B, Hkv, Lk, d] keys, lower-right aligned."""
    lq, lk = q.shape[-2], k.shape[-2]
    mask = None if lq in (1, lk) else causal_lower_right(lq, lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=lq == lk and lq > 1, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _exact(q, k, v, segments, features: AttentionFeatures, window, key_valid=None):
    return segment_attention(q, k, v, segments, scale=features.scale, softcap=features.softcap, window=window,
                             sinks=features.sinks, key_valid=key_valid, chunk_elements=settings.chunk_elements)


def packed_attention(query, key, value, layouts, features: AttentionFeatures, module=None) -> torch.Tensor:
    """query [R, Hq, L, d], key / value [R, Hkv, L, d], one RowLayout per row -> [R, Hq, L, d]."""
    rows, _, length, _ = query.shape
    if len(layouts) != rows:
        raise ValueError(f"{len(layouts)} layouts for {rows} rows")
    for r, layout in enumerate(layouts):
        p, lengths = layout.prefix_length, layout.response_lengths
        if p < 1 or not lengths or min(lengths) < 1:
            raise ValueError(f"row {r}: layout {layout} needs a prefix and responses of at least one token each")
        if p + sum(lengths) > length:
            raise ValueError(f"row {r}: layout {layout} is longer than the row ({length} tokens)")
    if settings.backend == "flex" and features.sinks is None:
        from .flex import flex_packed_attention

        return flex_packed_attention(query, key, value, layouts, features)
    outputs = []
    for r, layout in enumerate(layouts):
        p, lengths = layout.prefix_length, layout.response_lengths
        window = features.effective_window(p + max(lengths))
        # transformers hands over [heads, L, d] views of [L, heads, d] projections; contiguous copies replace them
        # (nothing else keeps the views; key/value heads: no head is expanded), the rows the exact path's chunked
        # matmuls were tuned on. (The flash path measured the same on the views: 8K llama step, fp32.)
        q, k, v = query[r].contiguous(), key[r].contiguous(), value[r].contiguous()
        if features.plain and window is None:  # the prefix in one flash call; responses see it in place
            if merged.supported(q):
                key_block = merged.key_block_for(q[None], settings.chunk_elements)
                head = merged.causal_prefix(q[None, :, :p], k[None, :, :p], v[None, :, :p], features.scale,
                                            key_block)[0]
                tail = merged.responses_over_prefix(q[None], k[None], v[None], p, lengths, features.scale,
                                                    key_block)[0]
            else:
                head = _sdpa_causal(q[None, :, :p], k[None, :, :p], v[None, :, :p], features.scale)[0]
                tail = _exact(q, k, v, _row_segments(p, lengths, False), features, None)
            parts = [head, tail]
        else:
            parts = [_exact(q, k, v, _row_segments(p, lengths, True), features, window)]
        padding = length - p - sum(lengths)
        if padding:
            parts.append(q.new_zeros(q.shape[0], padding, q.shape[2]))
        outputs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return outputs[0][None] if rows == 1 else torch.stack(outputs)


def unpacked_attention(query, key, value, attention_mask, features: AttentionFeatures, module) -> torch.Tensor:
    """Causal attention of ordinary rows (evaluation, generation with a KV cache: queries are the last Lq
    positions); ``attention_mask`` None or [B, Lk] bool (False = padding key)."""
    batch, _, lq, _ = query.shape
    lk = key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention '{ATTENTION_NAME}' on {family(module)}: a {attention_mask.dim()}-D attention "
                         "mask is not supported (pass a [batch, length] padding mask, or none)")
    valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
    window = features.effective_window(lk)
    if features.plain and window is None and valid is None:
        return _sdpa_causal(query, key, value, features.scale)
    segments = [Segment(0, lq, lk - lq, (KeyBlock(0, lk, 0),))]
    return torch.stack([_exact(query[b], key[b], value[b], segments, features, window,
                               None if valid is None else valid[b, -lk:]) for b in range(batch)])


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, *, shared_prefix_layouts: Sequence = None,
                            **kwargs):
    """query [R, Hq, L, d], key/value [R, Hkv, L, d] -> (output [R, L, Hq, d], None)."""
    features = read_features(module, query, key, dropout=dropout, scaling=scaling, kwargs=kwargs,
                             head_slice=settings.head_slice, name=ATTENTION_NAME)
    if shared_prefix_layouts is None:
        out = unpacked_attention(query, key, value, attention_mask, features, module)
    else:
        if attention_mask is not None:
            raise ValueError(f"attention '{ATTENTION_NAME}' builds its own masking for packed rows; pass "
                             "attention_mask=None")
        out = packed_attention(query, key, value, shared_prefix_layouts, features, module)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size=None, cache_position=None, kv_length=None, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers' mask hook for this attention: the [B, Lk] padding mask itself (or None) — the attention
    builds causal, window and segment masks on its own, so no [L, L] mask is ever formed."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    return attention_mask[:, kv_offset:kv_offset + kv_length] if kv_length is not None else attention_mask


def register_shared_prefix_attention() -> str:
    """Registers the attention function and its mask hook with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, padding_mask)
    return ATTENTION_NAME


def enable_shared_prefix_attention(model, *, backend: Optional[str] = None,
                                   chunk_elements: Optional[int] = None) -> None:
    """Switches the model's attention to the shared-prefix kernel, for good (gradient checkpointing
    re-runs layers in the backward, so a temporary switch would recompute with another attention).
    ``backend`` ("exact" | "flex") and ``chunk_elements`` (scores per query chunk) apply process-wide."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        settings.backend = backend
    if chunk_elements is not None:
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an integer >= 1, got {chunk_elements!r}")
        settings.chunk_elements = chunk_elements
    register_shared_prefix_attention()
    lm = unwrap_causal_lm(model)
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(ATTENTION_NAME)
    else:
        lm.config._attn_implementation = ATTENTION_NAME

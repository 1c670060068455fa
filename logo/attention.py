"""Shared-prefix attention for packed rows ``[prefix | response_0 | ... | response_M | padding]``.

Prefix tokens attend causally within the prefix; the tokens of a response attend to the whole prefix
and causally to their own response, never to another response; padding attends to nothing and its
output is 0. Each segment is one ``scaled_dot_product_attention`` call over [prefix keys | its own keys]
with a lower-right causal bias (``torch.nn.attention.bias.causal_lower_right``), so no dense L x L mask
is ever built; memory is that of the prefix keys plus one response.

Registered with transformers' AttentionInterface as ``"logo_shared_prefix"``: a model set to it
(``model.set_attn_implementation("logo_shared_prefix")``) reads ``shared_prefix_layouts=`` (the
``layouts`` of a :class:`logo.data.packing.PackedBatch`) among the forward's keyword arguments. Without
it the call is ordinary causal SDPA (transformers' own), so the same model still evaluates and generates
plain sequences (with a KV cache) — no switching back and forth.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from logo_kernels.integrations.hf import unwrap_causal_lm

ATTENTION_NAME = "logo_shared_prefix"

# the bias objects hold no data (two lengths); built once per shape, outside any tracing / dispatch mode
_causal_lower_right = functools.lru_cache(maxsize=1024)(causal_lower_right)


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, *, shared_prefix_layouts: Sequence = None,
                            **kwargs):
    """query [R, Hq, L, d], key/value [R, Hkv, L, d] -> (output [R, L, Hq, d], None)."""
    if shared_prefix_layouts is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise ValueError(f"attention '{ATTENTION_NAME}' builds its own masking; pass attention_mask=None")
    rows, heads, length, _ = query.shape
    if len(shared_prefix_layouts) != rows:
        raise ValueError(f"{len(shared_prefix_layouts)} layouts for {rows} rows")
    groups = heads // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    dropout = dropout if module.training else 0.0
    out = query.new_zeros(query.shape)
    for r, layout in enumerate(shared_prefix_layouts):
        p = layout.prefix_length
        if p + sum(layout.response_lengths) > length:
            raise ValueError(f"row {r}: layout {layout} is longer than the row ({length} tokens)")
        out[r, :, :p] = F.scaled_dot_product_attention(query[r:r + 1, :, :p], key[r:r + 1, :, :p],
                                                       value[r:r + 1, :, :p], dropout_p=dropout, is_causal=True,
                                                       scale=scaling)[0]
        start = p
        for n in layout.response_lengths:
            keys = torch.cat([key[r:r + 1, :, :p], key[r:r + 1, :, start:start + n]], dim=2)
            values = torch.cat([value[r:r + 1, :, :p], value[r:r + 1, :, start:start + n]], dim=2)
            out[r, :, start:start + n] = F.scaled_dot_product_attention(
                query[r:r + 1, :, start:start + n], keys, values, attn_mask=_causal_lower_right(n, p + n),
                dropout_p=dropout, scale=scaling)[0]
            start += n
    return out.transpose(1, 2).contiguous(), None


def register_shared_prefix_attention() -> str:
    """Registers the attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    return ATTENTION_NAME


def enable_shared_prefix_attention(model) -> None:
    """Switches the model's attention to the shared-prefix kernel, for good (gradient checkpointing
    re-runs layers in the backward, so a temporary switch would recompute with another attention)."""
    register_shared_prefix_attention()
    lm = unwrap_causal_lm(model)
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(ATTENTION_NAME)
    else:
        lm.config._attn_implementation = ATTENTION_NAME

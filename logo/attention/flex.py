"""Shared-prefix attention as one FlexAttention kernel per layer (opt-in: ``backend="flex"``; CUDA).

Every position of a packed row gets a segment id (0 = prefix, j + 1 = response j, -1 = padding) and a frame
index (its index in the unpacked ``[prefix | response]`` sequence); the block mask allows key ``kv`` for query
``q`` iff both are real tokens, the key is in the prefix or in the query's own segment, ``frame[kv] <=
frame[q]`` and, with a window ``W``, ``frame[q] - frame[kv] < W``. Softcap is a score mod; GQA is native
(``enable_gqa``). The block mask is built once per (layouts, length, window) and shared by the layers.
FlexAttention has no backward on CPU (torch raises): there the path serves inference only.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .features import AttentionFeatures

_MASKS: dict = {}


def row_tables(layouts, length: int, device):
    """(segment ids [R, L] int32, frame indices [R, L] int32) of packed rows (module doc)."""
    seg = torch.full((len(layouts), length), -1, dtype=torch.int32)
    frame = torch.zeros((len(layouts), length), dtype=torch.int32)
    for r, layout in enumerate(layouts):
        p = layout.prefix_length
        seg[r, :p] = 0
        frame[r, :p] = torch.arange(p, dtype=torch.int32)
        start = p
        for j, n in enumerate(layout.response_lengths):
            seg[r, start:start + n] = j + 1
            frame[r, start:start + n] = p + torch.arange(n, dtype=torch.int32)
            start += n
    return seg.to(device), frame.to(device)


def block_mask_for(layouts, length: int, window: Optional[int], device):
    """The (cached) BlockMask of the rows' shared-prefix pattern (module doc)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (tuple(layouts), length, window, str(device))
    if key not in _MASKS:
        seg, frame = row_tables(layouts, length, device)

        def mask_mod(b, h, q, kv):
            sq, sk, fq, fk = seg[b, q], seg[b, kv], frame[b, q], frame[b, kv]
            ok = (sq >= 0) & (sk >= 0) & ((sk == 0) | (sk == sq)) & (fk <= fq)
            return ok & (fq - fk < window) if window is not None else ok

        if len(_MASKS) >= 8:
            _MASKS.clear()
        _MASKS[key] = (create_block_mask(mask_mod, len(layouts), None, length, length, device=device), seg)
    return _MASKS[key]


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_packed_attention(query, key, value, layouts, features: AttentionFeatures) -> torch.Tensor:
    """query [R, Hq, L, d], key / value [R, Hkv, L, d] -> [R, Hq, L, d] (sinks are not handled here)."""
    from torch.nn.attention.flex_attention import flex_attention

    if features.sinks is not None:
        raise ValueError("the flex path does not handle attention sinks (the exact path does)")
    if query.device.type != "cuda" and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError("backend 'flex': FlexAttention has no backward on CPU; use backend 'exact' to train here")
    length = query.shape[2]
    extent = max(layout.prefix_length + max(layout.response_lengths) for layout in layouts)
    window = features.effective_window(extent)
    block_mask, seg = block_mask_for(layouts, length, window, query.device)
    cap = features.softcap
    score_mod = None if cap is None else (lambda s, b, h, q, kv: cap * torch.tanh(s / cap))
    run = _compiled() if query.device.type == "cuda" else flex_attention
    out = run(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=features.scale,
              enable_gqa=query.shape[1] != key.shape[1])
    return out * (seg >= 0)[:, None, :, None].to(out.dtype)  # padding outputs 0

"""What a transformers attention call asks for, read from its arguments — or refused.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask, dropout=,
scaling=, **kwargs)``; the model decides the keyword arguments. The features that change the result are
read into :class:`AttentionFeatures` (each honoured exactly by :mod:`logo.attention.exact`):

* ``sliding_window`` (Mistral, Qwen2, Gemma 2/3, GPT-OSS, ... per layer): a query sees the ``W`` most recent
  keys of its own sequence, itself included — transformers' convention (``masking_utils.sliding_window_overlay``:
  ``kv_idx > q_idx - W``), the same for every family and attention backend;
* ``softcap`` (Gemma 2): scores ``cap * tanh(s / cap)`` before the softmax;
* ``s_aux`` (GPT-OSS attention sinks): one logit per query head added to the softmax's denominator;
* ``scaling`` (any, default ``d ** -0.5``) and grouped key/value heads (GQA/MQA, from the shapes).

Arguments that change nothing here (``position_ids`` — RoPE is already applied —, ``use_cache``,
``cache_position``, ``output_router_logits``, ...) are accepted; anything else is refused with a ValueError
naming the model family and the argument, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# keyword arguments that do not change the attention's result (RoPE is applied before the call; the cache is
# written by the layer; router logits are the MoE block's business)
IGNORED = frozenset({"position_ids", "use_cache", "cache_position", "output_router_logits", "layer_idx",
                     "past_key_value", "past_key_values", "position_embeddings"})


def family(module: torch.nn.Module) -> str:
    """The model family of an attention module, for messages (``Gemma2Attention`` -> ``Gemma2``)."""
    name = type(module).__name__
    for suffix in ("SdpaAttention", "FlashAttention2", "Attention"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class AttentionFeatures:
    """The parts of an attention call that change its result (module doc). ``sinks`` [Hq] or None."""

    scale: float
    window: Optional[int] = None
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None
    dropout: float = 0.0

    @property
    def plain(self) -> bool:
        """No softcap and no sinks: what ``scaled_dot_product_attention`` computes exactly."""
        return self.softcap is None and self.sinks is None

    def effective_window(self, extent: int) -> Optional[int]:
        """The window, or None where it cannot cut anything within ``extent`` positions of one sequence."""
        return None if self.window is None or self.window >= extent else self.window


def _positive_number(value, what: str, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value \
            or value == float("inf"):
        raise ValueError(f"{where}: {what} must be a finite number > 0, got {value!r}")
    return value


def read_features(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *, dropout, scaling,
                  kwargs: dict, head_slice: Optional[tuple] = None, name: str = "logo_shared_prefix"
                  ) -> AttentionFeatures:
    """Reads and checks the call's features (module doc). ``head_slice`` = (rank, size) when the call holds the
    query heads [rank·Hq, (rank+1)·Hq) of a model with size·Hq heads (Ulysses sequence parallelism)."""
    where = f"attention '{name}' on {family(module)}"
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in IGNORED and k not in ("sliding_window", "softcap", "s_aux", "is_causal",
                                                       "output_attentions") and v is not None)
    if unknown:
        raise ValueError(f"{where}: cannot honour the attention argument(s) {unknown} (refused rather than "
                         "dropped; packed rows carry their layout in shared_prefix_layouts)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{where}: bidirectional (is_causal=False) attention is not supported")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{where}: output_attentions=True is not supported (no attention weights are formed); "
                         "use attn_implementation='eager' to read them")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{where}: {heads} query heads do not group over {kv_heads} key/value heads")
    window = kwargs.get("sliding_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{where}: sliding_window must be an integer >= 1, got {window!r}")
    softcap = kwargs.get("softcap")
    if softcap is not None:
        softcap = float(_positive_number(softcap, "softcap", where))
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if not torch.is_tensor(sinks) or sinks.dim() != 1:
            raise ValueError(f"{where}: s_aux (attention sinks) must be a 1-D tensor of one logit per query head")
        if sinks.numel() != heads:
            if head_slice is not None and sinks.numel() == heads * head_slice[1]:
                sinks = sinks[head_slice[0] * heads:(head_slice[0] + 1) * heads]
            else:
                raise ValueError(f"{where}: s_aux has {sinks.numel()} logits for {heads} query heads")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(_positive_number(scaling, "scaling", where))
    dropout = float(dropout or 0.0)
    if dropout and module.training:
        raise ValueError(f"{where}: attention dropout {dropout} in training is not supported (LOGO trains with "
                         "dropout off: set the model config's attention_dropout to 0)")
    return AttentionFeatures(scale, window, softcap, sinks, 0.0)

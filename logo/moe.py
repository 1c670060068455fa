"""Mixture-of-experts: the router's load-balancing loss of packed rows, as the model's own forward adds it.

A transformers MoE causal LM (Mixtral, Qwen2/3-MoE, GPT-OSS, ...) adds ``router_aux_loss_coef *
load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`` to its loss when its config says
``output_router_logits``. The packed LOGO path runs the decoder only, so :func:`router_aux_loss` computes that term
with the model module's own function and coefficient over the real (non-padding) tokens of each packed row — when
the config asks for it *and* a router parameter trains (full fine-tuning; LoRA leaves routers frozen, and then
nothing changes). The prefix of a packed row is routed once, as it is encoded once.
"""
from __future__ import annotations

import re
import sys
import torch

from logo_kernels.integrations.hf import unwrap_causal_lm

_ROUTER_PARAMETER = re.compile(r"\.(gate|router)\.(weight|bias)$")


def _text_config(lm):
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


def router_parameters(model):
    """The routers' parameters (``...mlp.gate.weight``, ``...mlp.router.weight``, ``...block_sparse_moe.gate``)."""
    return [p for name, p in unwrap_causal_lm(model).named_parameters() if _ROUTER_PARAMETER.search(name)]


def wants_router_aux_loss(model) -> bool:
    """True when the model's own forward would add a router loss (``output_router_logits``) and a router trains."""
    lm = unwrap_causal_lm(model)
    if not getattr(_text_config(lm), "output_router_logits", False):
        return False
    return any(p.requires_grad for p in router_parameters(lm))


def router_aux_loss(model, router_logits, real_tokens: torch.Tensor) -> torch.Tensor:
    """``coef * load_balancing_loss_func(...)`` of the model's family over ``real_tokens`` [R, L] (1 = real)."""
    lm = unwrap_causal_lm(model)
    family = sys.modules[type(lm).__module__]
    loss_function = getattr(family, "load_balancing_loss_func", None)
    experts = getattr(lm, "num_experts", None)
    top_k = getattr(lm, "num_experts_per_tok", None)
    coef = getattr(lm, "router_aux_loss_coef", None)
    if loss_function is None or experts is None or top_k is None or coef is None or router_logits is None:
        raise ValueError(f"{type(lm).__name__}: output_router_logits is set but the model's router loss "
                         "(load_balancing_loss_func, num_experts, num_experts_per_tok, router_aux_loss_coef) "
                         "cannot be found; refusing to drop it")
    return coef * loss_function(router_logits, experts, top_k, real_tokens)


def real_token_mask(input_ids_shape, layouts, device) -> torch.Tensor:
    """[R, L] int64: 1 on each packed row's prefix and responses, 0 on its padding."""
    mask = torch.zeros(input_ids_shape, dtype=torch.long)
    for r, layout in enumerate(layouts):
        mask[r, :layout.prefix_length + sum(layout.response_lengths)] = 1
    return mask.to(device)

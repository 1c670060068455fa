"""Hugging Face causal LMs: run the backbone, score only the labelled positions with the fused loss.

The model's ``[rows, length, vocab]`` logits are never computed: the decoder's last hidden states are
gathered at the positions whose next-token label is not ``ignore_index`` and passed, with the LM-head
weight, to :func:`logo_kernels.logo_loss`. Works for plain and peft-wrapped models of the Llama, Mistral
and Qwen2 families (any ``*ForCausalLM`` whose decoder is ``model.<base_model_prefix>`` and whose head is
``get_output_embeddings()``). A LoRA adapter on ``lm_head`` is applied exactly (W + ΔW). Under DeepSpeed
ZeRO-3 the head weight is gathered with ``deepspeed.zero.GatheredParameters`` for the loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._zero3 import gathered
from ..losses.logo import LogoLoss, LogoLossOutput


def unwrap_causal_lm(model):
    """The ``*ForCausalLM`` inside peft / DeepSpeed / DDP wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeed, DDP
            model = model.module
        else:
            break
    return model


def causal_lm_parts(model) -> Tuple[torch.nn.Module, torch.nn.Module, Optional[float]]:
    """(decoder backbone, LM-head module, final logit softcap or None) of a causal LM."""
    lm = unwrap_causal_lm(model)
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise TypeError(f"{type(lm).__name__} does not look like a causal LM (needs .{lm.base_model_prefix} and "
                        "get_output_embeddings())")
    config = getattr(lm, "config", None)
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        raise NotImplementedError("models with config.logit_scale != 1 are not supported yet")
    return backbone, head, getattr(config, "final_logit_softcapping", None)


def lm_head_weight_and_bias(head: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Effective (weight [V, D], bias) of the head, including unmerged, active LoRA adapters (exact)."""
    if not hasattr(head, "base_layer"):
        return head.weight, getattr(head, "bias", None)
    base = head.base_layer
    weight, bias = base.weight, base.bias
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return weight, bias
    for name in head.active_adapters:
        if name not in getattr(head, "lora_A", {}):
            continue
        if getattr(head, "use_dora", {}).get(name, False):
            raise NotImplementedError("DoRA on lm_head is not supported by the fused loss")
        dropout = head.lora_dropout[name]
        if head.training and not isinstance(dropout, torch.nn.Identity):
            raise NotImplementedError("LoRA dropout on lm_head acts on inputs, not on the weight: set "
                                      "lora_dropout=0 (LOGO's recipe) or leave lm_head out of target_modules")
        weight = weight + head.get_delta_weight(name)
    return weight, bias


def response_hidden_states(hidden: torch.Tensor, labels: torch.Tensor, sequence_ids: Optional[torch.Tensor] = None,
                           num_sequences: Optional[int] = None, ignore_index: int = -100):
    """Gathers the scored positions of a batch, grouped by sequence.

    hidden [R, L, D] decoder outputs; labels [R, L] token ids (HF convention, unshifted: position t-1
    predicts labels[t]) with ``ignore_index`` where not scored; sequence_ids [R, L] (default: row r is
    sequence r) says which scored sequence a label belongs to (several per packed row; -1 for none).
    Returns (hidden [T, D], targets [T], cu_seqlens [S + 1]) with tokens ordered by sequence.
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden.shape[:2])}")
    rows, length = labels.shape
    if sequence_ids is None:
        sequence_ids = torch.arange(rows, device=labels.device)[:, None].expand(rows, length)
        num_sequences = rows if num_sequences is None else num_sequences
    elif sequence_ids.shape != labels.shape:
        raise ValueError(f"sequence_ids {tuple(sequence_ids.shape)} must match labels {tuple(labels.shape)}")
    next_labels = labels[:, 1:]
    next_ids = sequence_ids[:, 1:]
    scored = (next_labels != ignore_index) & (next_ids >= 0)
    seq = next_ids[scored]
    order = torch.argsort(seq, stable=True)
    if num_sequences is None:
        num_sequences = int(seq.max()) + 1 if seq.numel() else 0
    counts = torch.bincount(seq, minlength=num_sequences)
    if counts.numel() > num_sequences:
        raise ValueError(f"sequence_ids reach {counts.numel() - 1} but num_sequences = {num_sequences}")
    cu_seqlens = torch.zeros(num_sequences + 1, dtype=torch.int64, device=labels.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    return hidden[:, :-1][scored][order], next_labels[scored][order], cu_seqlens


def decoder_hidden_states(model, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                          position_ids: Optional[torch.Tensor] = None, **backbone_kwargs) -> torch.Tensor:
    """Last hidden states [R, L, D] of the causal LM's decoder (its head is not run)."""
    backbone, _, _ = causal_lm_parts(model)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **backbone_kwargs)
    return outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state


def head_logo_loss(model, hidden: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                   loss_fn: LogoLoss) -> LogoLossOutput:
    """``loss_fn`` on gathered hidden states [T, D] with the model's LM head (LoRA on it applied exactly,
    final-logit softcap honoured, gathered under ZeRO-3)."""
    _, head, softcap = causal_lm_parts(model)
    base = getattr(head, "base_layer", head)
    if hasattr(base.weight, "ds_id") and torch.is_grad_enabled() and any(
            p.requires_grad for p in head.parameters()):
        # The head weight is gathered only for this block; a trainable head would need its gradient
        # reduced into the partitions, which is not wired (yet). A frozen head (LoRA) saves what its
        # backward needs (W[target] rows) before the block ends.
        raise NotImplementedError("a trainable lm_head under ZeRO-3 is not supported by the fused loss yet: "
                                  "freeze lm_head (LoRA) or use ZeRO-1/2")
    with gathered(base.weight, getattr(base, "bias", None)):
        weight, bias = lm_head_weight_and_bias(head)
        return loss_fn(hidden, weight.to(hidden.dtype), targets, cu_seqlens,
                       None if bias is None else bias.to(hidden.dtype), softcap=softcap)


def causal_lm_logo_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, loss_fn: LogoLoss, *,
                        attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None,
                        sequence_ids: Optional[torch.Tensor] = None,
                        num_sequences: Optional[int] = None,
                        **backbone_kwargs) -> LogoLossOutput:
    """LOGO loss of a causal LM on a batch of sequences, without the model's logits.

    Rows (or, with ``sequence_ids``, sequences inside packed rows) are grouped per example as
    [chosen, rejected_1..M]; ``labels`` is -100 (``loss_fn.ignore_index``) on prompt and padding.
    Extra keyword arguments go to the decoder (e.g. an attention-mask function for packed rows).
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **backbone_kwargs)
    h, targets, cu_seqlens = response_hidden_states(hidden, labels, sequence_ids, num_sequences,
                                                    loss_fn.ignore_index)
    return head_logo_loss(model, h, targets, cu_seqlens, loss_fn)

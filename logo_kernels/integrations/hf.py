"""Hugging Face causal LMs on the fused op: the model's ``[rows, length, vocab]`` logits are never computed.

Two entry points:

* :func:`apply` / :func:`revert` — for plain Hugging Face users (``Trainer``, accelerate, own loops): after
  ``apply(model)``, ``model(input_ids, labels=labels)`` returns the causal-LM loss computed by
  :func:`logo_kernels.linear_logprobs` from the decoder's hidden states — Hugging Face's shift (position t-1
  predicts ``labels[t]``; pre-shifted ``shift_labels``, passed with ``labels`` as Hugging Face wants, are scored
  as given), the mean over non-ignored tokens,
  ``num_items_in_batch`` honoured (sum / num_items_in_batch, as the ``Trainer`` passes under gradient
  accumulation) — with ``logits=None``. Calls without labels (generation, evaluation of logits) run the
  original forward, untouched.
* :func:`causal_lm_logo_loss` / :func:`head_logo_loss` — the LOGO loss of preference rows.

Any ``*ForCausalLM`` whose decoder is ``model.<base_model_prefix>`` and whose head is ``get_output_embeddings()``:
Llama, Mistral, Qwen2/3, Gemma 2/3 (``final_logit_softcapping``), Phi-3, Cohere (``logit_scale``), Granite
(``logits_scaling``), ...; plain or peft-wrapped (a LoRA adapter on ``lm_head`` is applied exactly, W + ΔW).
Under DeepSpeed ZeRO-3 the op gathers the head for its forward and again for its backward, and the head's
gradient goes to its partitions like any other (a trainable head works).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._zero3 import gathered
from .._validation import check_filter_eps
from ..linear_logprobs import linear_logprobs
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


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to its logits after the head: ``softcap`` (Gemma 2/3) and a scale (Cohere's
    ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Granite's 1 / ``logits_scaling``)."""

    softcap: Optional[float] = None
    logit_scale: float = 1.0

    #: config attributes that scale the logits after the head, in the order they are read: Cohere, Falcon-H1, Muse,
    #: then Granite's and HyperCLOVA X's ``logits_scaling``
    SCALE_ATTRIBUTES = ("logit_scale", "lm_head_multiplier", "output_multiplier", "logits_scaling")
    #: families whose ``logits_scaling`` multiplies the logits (MuP); Granite and the others divide by it
    MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)

    @staticmethod
    def text_config(config):
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @classmethod
    def scale_attribute(cls, config) -> Optional[str]:
        """The attribute of the (text) config that scales this model's logits, or None."""
        text = cls.text_config(config)
        return next((name for name in cls.SCALE_ATTRIBUTES if getattr(text, name, None) is not None), None)

    @classmethod
    def of(cls, config) -> "HeadTransform":
        text = cls.text_config(config)
        name, scale = cls.scale_attribute(config), 1.0
        if name == "logits_scaling":
            family = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
            multiplies = family.startswith(cls.MULTIPLYING_LOGITS_SCALING)
            scale = float(text.logits_scaling) if multiplies else 1.0 / text.logits_scaling
        elif name is not None:
            scale = float(getattr(text, name))
        return cls(getattr(text, "final_logit_softcapping", None), scale)


def causal_lm_parts(model) -> Tuple[torch.nn.Module, torch.nn.Module, HeadTransform]:
    """(decoder backbone, LM-head module, what the model does to its logits) of a causal LM."""
    lm = unwrap_causal_lm(model)
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise TypeError(f"{type(lm).__name__} does not look like a causal LM (needs .{lm.base_model_prefix} and "
                        "get_output_embeddings())")
    return backbone, head, HeadTransform.of(lm.config)


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
    """``loss_fn`` on gathered hidden states [T, D] with the model's LM head (LoRA on it applied exactly, the
    model's softcap / logit scale honoured; under ZeRO-3 the op gathers the head itself)."""
    _, head, transform = causal_lm_parts(model)
    with effective_head(head) as (weight, bias):
        return loss_fn(hidden, weight, targets, cu_seqlens, bias, softcap=transform.softcap,
                       logit_scale=transform.logit_scale)


@contextlib.contextmanager
def effective_head(head: torch.nn.Module):
    """(weight, bias) of the head for the block: the parameters themselves (the op gathers them under ZeRO-3),
    or W + ΔW of a LoRA-wrapped head, computed with W gathered."""
    if not hasattr(head, "base_layer"):
        yield lm_head_weight_and_bias(head)
        return
    base = head.base_layer
    with gathered(base.weight, getattr(base, "bias", None)):
        yield lm_head_weight_and_bias(head)


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


# ---- apply / revert: model(input_ids, labels=...) returns the fused causal-LM loss ---------------------------
_ORIGINAL = "_logo_kernels_original_forward"


def apply(model, *, backend: str = "auto", filter_eps=None):
    """Patches ``model`` (a ``*ForCausalLM``, plain or peft-wrapped) so that calls with ``labels`` return the fused
    loss and ``logits=None`` (module doc); returns ``model``. Idempotent (a second call keeps the first's options).
    ``filter_eps``: the op's gradient filtering (None: exact; "auto" or a float, docs/filtering.md)."""
    check_filter_eps(filter_eps, torch.float32)
    lm = unwrap_causal_lm(model)
    causal_lm_parts(lm)  # raises for anything that is not a causal LM
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text, "output_router_logits", False):
        raise NotImplementedError(f"{type(lm).__name__} adds a router load-balancing loss (output_router_logits): "
                                  "not supported by hf.apply")
    if hasattr(lm, _ORIGINAL):
        return model
    original = lm.forward
    signature = inspect.signature(type(lm).forward)

    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(type(lm).forward)  # keeps the signature: generate() validates its kwargs against it
    def fused_forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        extra = bound.pop(var_keyword, {}) if var_keyword else {}
        named = {**{k: v for k, v in bound.items() if k != "self"}, **extra}
        labels, shift_labels = named.pop("labels", None), named.pop("shift_labels", None)
        if labels is None:  # as Hugging Face: no labels, no loss (shift_labels only replace the shifted labels)
            return original(*args, **kwargs)
        return _fused_loss(self, named, labels, shift_labels, backend, filter_eps)

    setattr(lm, _ORIGINAL, original)
    lm.forward = types.MethodType(fused_forward, lm)
    return model


def revert(model):
    """Undoes :func:`apply`; returns ``model``. Idempotent."""
    lm = unwrap_causal_lm(model)
    if hasattr(lm, _ORIGINAL):
        del lm.forward  # the instance attribute: the class's forward shows through again
        delattr(lm, _ORIGINAL)
    return model


def is_applied(model) -> bool:
    return hasattr(unwrap_causal_lm(model), _ORIGINAL)


_NOT_FOR_THE_BACKBONE = ("logits_to_keep", "num_items_in_batch", "return_dict")


def _fused_loss(lm, named: dict, labels, shift_labels, backend: str, filter_eps=None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = named.get("num_items_in_batch")
    backbone, head, transform = causal_lm_parts(lm)
    outputs = backbone(**{k: v for k, v in named.items() if k not in _NOT_FOR_THE_BACKBONE})
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    if shift_labels is None:  # position t - 1 predicts labels[t]
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(targets.shape)} do not match the sequence {tuple(hidden.shape[:-1])}")
    targets = targets.to(hidden.device)
    scored = targets != -100
    with effective_head(head) as (weight, bias):
        logp = linear_logprobs(hidden[scored], weight, targets[scored], bias, softcap=transform.softcap,
                               logit_scale=transform.logit_scale, backend=backend, filter_eps=filter_eps)
    total = -logp.sum()
    if num_items_in_batch is None:  # mean over the scored tokens (0 / 0 = nan when there is none, as in HF)
        loss = total / scored.sum()
    else:
        loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))

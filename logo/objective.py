"""The LOGO objective on shared-prefix packed rows of a Hugging Face causal LM.

``packed_logo_loss`` runs the decoder once per packed row (the long prefix encoded once for all M + 1
responses), gathers the hidden states that predict the scored tokens, and applies the fused LOGO loss
with the model's LM head — neither the full logits nor a dense attention mask is ever built. A
mixture-of-experts model whose own forward would add its router's load-balancing loss gets it added here too
(:mod:`logo.moe`).
"""
from __future__ import annotations

import dataclasses

from logo_kernels import LogoLoss, LogoLossOutput
from logo_kernels.integrations.hf import causal_lm_parts, unwrap_causal_lm, head_logo_loss

from .attention import ATTENTION_NAME, enable_shared_prefix_attention  # noqa: F401 (re-exported)
from .data.packing import PackedBatch
from .moe import real_token_mask, router_aux_loss, wants_router_aux_loss


def packed_logo_loss(model, batch: PackedBatch, loss_fn: LogoLoss, sequence_parallel=None,
                     pad_token_id: int = 0) -> LogoLossOutput:
    """LOGO loss of the examples packed in ``batch`` (see :func:`logo.data.packing.pack_rows`). With a
    :class:`logo.sequence_parallel.SequenceParallel` (training mode) each rank runs its shard of the rows and the
    loss is the full rows' (:mod:`logo.sequence_parallel`)."""
    if getattr(unwrap_causal_lm(model).config, "_attn_implementation", None) != ATTENTION_NAME:
        raise ValueError("the model must use shared-prefix attention for packed rows: call "
                         "logo.attention.enable_shared_prefix_attention(model) once before training")
    if batch.num_negatives != loss_fn.num_negatives:
        raise ValueError(f"the batch packs {batch.num_negatives} rejected responses per example, the loss "
                         f"expects num_negatives = {loss_fn.num_negatives}")
    with_router_loss = model.training and wants_router_aux_loss(model)
    if sequence_parallel is not None and model.training:
        from .sequence_parallel import shard, sharded_logo_loss

        if with_router_loss:
            raise ValueError(f"{type(unwrap_causal_lm(model)).__name__}: the router load-balancing loss under "
                             "sequence parallelism is not supported (each rank routes a shard); freeze the routers "
                             "or set the model config's output_router_logits to false")
        sharded = shard(batch, sequence_parallel.size, sequence_parallel.rank, pad_token_id)
        return sharded_logo_loss(model, sharded, loss_fn, sequence_parallel)
    backbone, _, _ = causal_lm_parts(model)
    extra = {"output_router_logits": True} if with_router_loss else {}
    outputs = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       shared_prefix_layouts=batch.layouts, **extra)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
    out = head_logo_loss(model, scored, batch.targets, batch.cu_seqlens, loss_fn)
    if not with_router_loss:
        return out
    aux = router_aux_loss(model, outputs.router_logits,
                          real_token_mask(batch.input_ids.shape, batch.layouts, batch.input_ids.device))
    return dataclasses.replace(out, loss=out.loss + aux, aux_loss=aux.detach())

"""The LOGO objective on shared-prefix packed rows of a Hugging Face causal LM.

``packed_logo_loss`` runs the decoder once per packed row (the long prefix encoded once for all M + 1
responses), gathers the hidden states that predict the scored tokens, and applies the fused LOGO loss
with the model's LM head — neither the full logits nor a dense attention mask is ever built.
"""
from __future__ import annotations

from logo_kernels import LogoLoss, LogoLossOutput
from logo_kernels.integrations.hf import unwrap_causal_lm, decoder_hidden_states, head_logo_loss

from .attention import ATTENTION_NAME, enable_shared_prefix_attention  # noqa: F401 (re-exported)
from .data.packing import PackedBatch


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
    if sequence_parallel is not None and model.training:
        from .sequence_parallel import shard, sharded_logo_loss

        sharded = shard(batch, sequence_parallel.size, sequence_parallel.rank, pad_token_id)
        return sharded_logo_loss(model, sharded, loss_fn, sequence_parallel)
    hidden = decoder_hidden_states(model, batch.input_ids, position_ids=batch.position_ids,
                                   shared_prefix_layouts=batch.layouts)
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
    return head_logo_loss(model, scored, batch.targets, batch.cu_seqlens, loss_fn)

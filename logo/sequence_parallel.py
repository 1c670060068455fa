"""Exact sequence-parallel LOGO on DeepSpeed's Ulysses (ALST): one packed row sharded along the sequence across the
P ranks of a sequence-parallel group.

* Attention: DeepSpeed's ``UlyssesSPAttentionHF`` wraps the shared-prefix attention (``logo_shared_prefix``): each
  rank projects q/k/v for its own positions, an all-to-all gives every rank the whole sequence for H/P heads, the
  shared-prefix attention runs there with the row's global layout (every response sees the prefix and itself
  only), and a second all-to-all returns each rank its own positions. Position ids are sharded like the tokens
  (RoPE is applied before the exchange). Evaluation and generation run unsharded (``disable_in_eval``).
* Loss: targets are aligned to hidden positions *before* sharding — ``PackedBatch.score_index`` names the
  position that predicts each scored token, so a response token predicted by the last position of the previous
  shard is scored on that rank, never dropped. Each rank computes the fused log-probs of the scored tokens whose
  predictor it holds; per-sequence log-prob sums and token counts are all-reduced over the group (differentiable),
  and every rank evaluates the same LOGO loss on the same per-sequence means. Loss and gradients equal the
  unsharded ones (DeepSpeed averages the gradients over the group, which undoes the all-reduce backward's factor P).
* Rows are right-padded to a multiple of P with padding, which is never attended to nor scored.

Groups are DeepSpeed's (``parallel_state_sp``: contiguous ranks [i·P, (i+1)·P)); data parallelism runs across
groups. Requires DeepSpeed, attention heads divisible by P, and key/value heads divisible by P (or P by them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .data.packing import PackedBatch
from .errors import ConfigError


@dataclass
class SequenceParallel:
    size: int
    rank: int  # inside the group
    group: object  # the torch.distributed process group of the sequence-parallel ranks
    mpu: object  # DeepSpeed's parallel_state_sp, for deepspeed.initialize(mpu=...)
    data_parallel_rank: int
    data_parallel_size: int


def check_heads(model_config, size: int) -> None:
    """The Ulysses head rules, as a ConfigError naming the numbers."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ConfigError(f"sequence_parallel_size {size}: the model's {heads} attention heads are not divisible by it "
                          "(each rank attends with heads / P heads)")
    if kv_heads % size and size % kv_heads:
        raise ConfigError(f"sequence_parallel_size {size}: the model's {kv_heads} key/value heads must divide by it, or "
                          "it by them")


def setup(model, size: int, micro_batch_rows: int, world) -> Optional[SequenceParallel]:
    """Registers DeepSpeed's Ulysses attention around the model's shared-prefix attention and creates the groups;
    None for size 1. Call after the model is loaded (its attention set) and before ``deepspeed.initialize``."""
    if size == 1:
        return None
    if world.size % size:
        raise ConfigError(f"sequence_parallel_size {size} does not divide the world size {world.size}")
    from logo_kernels.integrations.hf import unwrap_causal_lm

    from .attention import ATTENTION_NAME, set_head_slice

    lm = unwrap_causal_lm(model)
    check_heads(lm.config, size)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    try:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            lm, core_attn_implementation=ATTENTION_NAME, sequence_parallel_size=size,
            micro_batch_size=micro_batch_rows, seq_length_is_variable=True, disable_in_eval=True)
    except ValueError as error:  # DeepSpeed refuses the attention or the heads
        raise ConfigError(f"DeepSpeed's Ulysses sequence parallelism refused the model: {error}") from None
    rank = mpu.get_sequence_parallel_rank()
    set_head_slice(rank, size)  # each rank attends with its P-th of the heads: per-head sinks follow
    return SequenceParallel(size, rank, mpu.get_sequence_parallel_group(), mpu, world.rank // size,
                            world.size // size)


@dataclass
class ShardedBatch:
    """This rank's part of a packed batch: input_ids / position_ids [R, L'/P] (L' = L padded to a multiple of P),
    the global layouts, and the scored tokens whose predicting position is on this rank."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layouts: List
    local_index: torch.Tensor  # [t] flat indices into this rank's [R * L'/P] hidden states
    targets: torch.Tensor  # [t]
    sequence_ids: torch.Tensor  # [t] which of the S sequences each scored token belongs to
    num_sequences: int
    num_negatives: int


def shard(batch: PackedBatch, size: int, rank: int, pad_token_id: int) -> ShardedBatch:
    """Pads the rows to a multiple of ``size`` and keeps columns [rank·L'/P, (rank+1)·L'/P) (module doc)."""
    rows, width = batch.input_ids.shape
    padded = -(-width // size) * size
    extra = padded - width
    input_ids = torch.nn.functional.pad(batch.input_ids, (0, extra), value=pad_token_id)
    position_ids = torch.nn.functional.pad(batch.position_ids, (0, extra), value=0)
    part = padded // size
    start = rank * part
    row, column = batch.score_index // width, batch.score_index % width
    mine = (column >= start) & (column < start + part)
    lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return ShardedBatch(input_ids[:, start:start + part].contiguous(), position_ids[:, start:start + part].contiguous(),
                        batch.layouts, (row * part + column - start)[mine], batch.targets[mine],
                        sequence_ids[mine], len(lengths), batch.num_negatives)


def sharded_logo_loss(model, sharded: ShardedBatch, loss_fn, sp: SequenceParallel):
    """The LOGO loss of the full rows from this rank's shard (module doc); the same value on every rank."""
    import torch.distributed.nn.functional as dist_nn

    import logo_kernels as lk
    from logo_kernels.integrations.hf import causal_lm_parts, decoder_hidden_states, effective_head
    from logo_kernels.losses.logo import means_from_sums

    hidden = decoder_hidden_states(model, sharded.input_ids, position_ids=sharded.position_ids,
                                   shared_prefix_layouts=sharded.layouts)
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sharded.local_index)
    _, head, transform = causal_lm_parts(model)
    with effective_head(head) as (weight, bias):
        logp = lk.linear_logprobs(scored, weight, sharded.targets, bias, softcap=transform.softcap,
                                  logit_scale=transform.logit_scale, backend=loss_fn.backend)
    sums = torch.zeros(sharded.num_sequences, dtype=logp.dtype, device=logp.device).index_add(
        0, sharded.sequence_ids, logp)
    counts = torch.zeros(sharded.num_sequences, dtype=logp.dtype, device=logp.device).index_add_(
        0, sharded.sequence_ids, torch.ones_like(logp))
    sums = dist_nn.all_reduce(sums, group=sp.group)
    torch.distributed.all_reduce(counts, group=sp.group)
    return loss_fn.from_means(means_from_sums(sums, counts, sharded.num_negatives))

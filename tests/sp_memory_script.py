"""Run by test_sequence_parallel.py under ``torchrun --nproc_per_node P`` (DS_ACCELERATOR=cpu, gloo).

argv: out.json context response negatives vocab dim layers checkpointing(0|1)
One packed row [prefix | M + 1 responses] of a tiny Llama (4 heads, 2 key/value heads, MLP 4·dim), sharded over the
P ranks with DeepSpeed's Ulysses attention; full fine-tuning with AdamW. The second full step (fwd + bwd + optimizer,
AdamW states existing) is traced op by op (:func:`logo.memory_trace.peak_of_a_training_step`) on every rank; rank 0
writes the per-rank peaks (bytes) and the model's shape to out.json.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import transformers  # noqa: E402

import logo_kernels as lk  # noqa: E402
from logo.data.packing import pack_rows  # noqa: E402
from logo.memory_trace import peak_of_a_training_step  # noqa: E402
from logo.attention import enable_shared_prefix_attention  # noqa: E402
from logo.sequence_parallel import SequenceParallel, shard, sharded_logo_loss  # noqa: E402


def main():
    out_path = sys.argv[1]
    context, response, negatives, vocab, dim, layers, checkpointing = map(int, sys.argv[2:9])
    deepspeed.init_distributed(dist_backend="gloo")
    size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=4 * dim,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=context + (negatives + 1) * response + 16,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).train()
    enable_shared_prefix_attention(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (context,), generator=g)
    answers = [torch.randint(0, vocab, (response,), generator=g) for _ in range(negatives + 1)]
    batch = pack_rows([prompt], [answers])
    loss_fn = lk.LogoLoss(num_negatives=negatives, beta=3.0, gamma=0.3, sft_weight=0.0)

    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation="logo_shared_prefix",
                                                          sequence_parallel_size=size, micro_batch_size=1,
                                                          seq_length_is_variable=True, disable_in_eval=True)
    sp = SequenceParallel(size, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group(), mpu, 0, 1)
    sharded = shard(batch, size, sp.rank, pad_token_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    peak = peak_of_a_training_step(model, lambda: sharded_logo_loss(model, sharded, loss_fn, sp).loss, optimizer)
    peaks = [None] * size
    torch.distributed.all_gather_object(peaks, peak)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"peaks": peaks, "intermediate": config.intermediate_size, "heads": 4, "kv_heads": 2}, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

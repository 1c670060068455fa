"""Run by test_sequence_parallel.py under ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu, gloo).

Builds a tiny Llama with GQA and the shared-prefix attention, packed rows with synthesized gapped positions whose
shard boundary falls (case) inside the prefix, inside a response, or exactly at a response's first token; computes
the unsharded LOGO loss and gradients on every rank first, then registers DeepSpeed's Ulysses attention and computes
the sharded loss (this rank's half of each row) and gradients (summed over the group / P, as DeepSpeed averages).
Rank 0 writes {case: {max differences}} to argv[1] as JSON. argv[2] (optional) names a family of
tests/model_zoo.py (a sliding-window or sink model) to use instead of the Llama.
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
from logo.data.positions import synthesize_positions  # noqa: E402
from logo.attention import enable_shared_prefix_attention  # noqa: E402
from logo.objective import packed_logo_loss  # noqa: E402
from logo.sequence_parallel import SequenceParallel, shard, sharded_logo_loss  # noqa: E402
from logo.attention import set_head_slice  # noqa: E402

VOCAB = 300
# (prefix length, response lengths) of the rows; the packed width is even, so the boundary sits at width / 2
CASES = {
    "boundary_in_prefix": (30, (5, 7, 6)),       # width 48, boundary 24: inside the prefix (0..29)
    "boundary_in_response": (10, (9, 8, 9)),     # width 36, boundary 18: the chosen's last token (10..18)
    "boundary_at_first_token": (7, (4, 6, 5)),   # width 22, boundary 11: rejected_1's first token (11..16)
}


def rows_for(case, g, vocab=VOCAB):
    prefix_len, responses = CASES[case]
    prefix = torch.randint(0, vocab, (prefix_len,), generator=g)
    answers = [torch.randint(0, vocab, (n,), generator=g) for n in responses]
    positions = synthesize_positions([prefix_len - 2], window=4096, prefix=2, tail=max(responses) + 1,
                                     strategy="continuous", generator=g).context  # gapped positions
    return prefix, answers, positions


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    out_path = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    family = sys.argv[2] if len(sys.argv) > 2 else None
    if family is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=4096, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).train()
    else:
        from model_zoo import build

        model = build(family).train()
    vocab = model.config.vocab_size
    enable_shared_prefix_attention(model)
    loss_fn = lk.LogoLoss(num_negatives=2, beta=2.0, gamma=0.3, sft_weight=0.5)
    g = torch.Generator().manual_seed(1)
    batches = {}
    for case in CASES:
        prefix, answers, positions = rows_for(case, g, vocab)
        prefix2, answers2, positions2 = rows_for(case, g, vocab)  # a second row of the same shape
        batches[case] = pack_rows([prefix, prefix2], [answers, answers2], prefix_positions=[positions, positions2])
    reference = {}
    for case, batch in batches.items():  # unsharded, before Ulysses is registered (its wrapper is process-global)
        model.zero_grad(set_to_none=True)
        out = packed_logo_loss(model, batch, loss_fn)
        out.loss.backward()
        reference[case] = (out, grads(model))

    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation="logo_shared_prefix",
                                                          sequence_parallel_size=2, micro_batch_size=2,
                                                          disable_in_eval=True)
    sp = SequenceParallel(2, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group(), mpu, 0, 1)
    set_head_slice(sp.rank, sp.size)  # what logo.sequence_parallel.setup does: per-head sinks follow the heads
    result = {}
    for case, batch in batches.items():
        model.zero_grad(set_to_none=True)
        sharded = shard(batch, sp.size, sp.rank, pad_token_id=0)
        out = sharded_logo_loss(model, sharded, loss_fn, sp)
        out.loss.backward()
        mine = grads(model)
        for value in mine.values():  # what DeepSpeed does: average over the group
            torch.distributed.all_reduce(value, group=sp.group)
            value /= sp.size
        ref_out, ref_grads = reference[case]
        width = batch.input_ids.shape[1]
        result[case] = {
            "width": width,
            "scored_here": int(sharded.local_index.numel()),
            "loss": abs(float(out.loss) - float(ref_out.loss)),
            "chosen_logps": float((out.chosen_logps - ref_out.chosen_logps).abs().max()),
            "rejected_logps": float((out.rejected_logps - ref_out.rejected_logps).abs().max()),
            "grads": max(float((mine[n] - ref_grads[n]).abs().max()) for n in ref_grads),
            "grad_names_equal": sorted(mine) == sorted(ref_grads),
            "grad_scale": max(float(v.abs().max()) for v in ref_grads.values()),
        }
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle, indent=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

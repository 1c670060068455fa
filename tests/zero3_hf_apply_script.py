"""A few steps of a plain training loop over hf.apply(model) — under DeepSpeed ZeRO-3 with 2 processes or plain
torch with 1 — writing the losses and the final weights to argv[1] (a .pt file). Run by test_distributed.py."""
import os
import sys

import torch
import transformers

from logo_kernels.integrations import hf

STEPS, ROWS, LENGTH, VOCAB = int(os.environ.get("STEPS", 3)), 4, 16, 211


def main(out_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = hf.apply(transformers.LlamaForCausalLM(config))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (STEPS, ROWS, LENGTH), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if world > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        rank = torch.distributed.get_rank()
        ds = {"train_micro_batch_size_per_gpu": ROWS // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    losses = []
    for step in range(STEPS):
        ids = data[step]
        if world > 1:
            mine = ids[rank * (ROWS // world):(rank + 1) * (ROWS // world)]
            loss = engine(input_ids=mine, labels=mine).loss
            engine.backward(loss)
            engine.step()
            value = loss.detach().clone()
            torch.distributed.all_reduce(value)
            losses.append(float(value) / world)
        else:
            loss = model(input_ids=ids, labels=ids).loss  # equal rows per rank: the mean of the ranks' means
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
    if world > 1:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            torch.save({"losses": losses, "weights": weights}, out_path)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    else:
        torch.save({"losses": losses, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   out_path)


if __name__ == "__main__":
    main(sys.argv[1])

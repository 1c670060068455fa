"""The base-model warm-up of the embedded toy: a tiny model trained from scratch needs a base model that can
retrieve at short real contexts before LOGO can extend it — the role a pretrained 8B model plays in the paper.

1. ``warmup_copy_steps`` of a copy curriculum: random-token sequences in which a random slice of an earlier span
   reappears after random filler; the loss is on the repeat, whose every token is the one that followed its
   previous occurrence. This forms induction heads (content-based copying; random lengths and gaps keep the
   model from solving it by position) in ~1,000 steps, against several thousand on the retrieval task alone.
   Stops early once the loss is below 0.3.
2. ``warmup_sft_steps`` of supervised fine-tuning on the chosen responses of the training records, with plain
   positions 0, 1, 2, ... (the short real contexts as they are): the base model.

Both use their own AdamW at ``warmup_lr`` on all trainable parameters and one process; LOGO then starts from the
result with a fresh optimizer. Losses go to metrics.jsonl (kind ``warmup``, step 0).
"""
from __future__ import annotations

import random
from typing import Callable, List

import torch

from .config import TrainConfig
from .data.encoding import EncodedExample

COPY_BATCH = 64
SFT_BATCH = 16
COPY_DONE_LOSS = 0.3


def _copy_batch(rng: random.Random, vocab: int, first_id: int, pad: int):
    rows = []
    for _ in range(COPY_BATCH):
        span = [rng.randrange(first_id, vocab) for _ in range(rng.randint(8, 24))]
        filler = [rng.randrange(first_id, vocab) for _ in range(rng.randint(0, 24))]
        a = rng.randrange(0, len(span) - 3)
        b = rng.randint(a + 3, len(span))
        rows.append((span + filler, span[a:b]))
    width = max(len(x) + len(y) for x, y in rows)
    ids = torch.full((COPY_BATCH, width), pad, dtype=torch.long)
    labels = torch.full((COPY_BATCH, width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x) + len(y)] = torch.tensor(x + y)
        labels[i, len(x) + 1:len(x) + len(y)] = torch.tensor(y[1:])  # every repeated token after the first
    return ids, labels


def _sft_batch(examples: List[EncodedExample], pad: int):
    rows = [e.prompt + e.responses[0] for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (e, row) in enumerate(zip(examples, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(e.prompt):len(row)] = torch.tensor(e.responses[0])
    return ids, labels


def base_warmup(model, examples: List[EncodedExample], config: TrainConfig, pad_token_id: int, vocab: int,
                device, log: Callable[[dict], None], progress: bool = True) -> dict:
    """Runs both stages (module doc) on ``model`` in place; returns their last losses and step counts."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.warmup_lr, betas=(0.9, 0.95))
    was_training = model.training
    model.train()

    def step(ids, labels) -> float:
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    summary = {"copy_steps": 0, "copy_loss": None, "sft_steps": 0, "sft_loss": None}
    first_id = min(8, vocab - 1)  # leave the special tokens out of the random sequences
    bar = tqdm(total=config.warmup_copy_steps, desc="warm-up: copy", disable=not progress, dynamic_ncols=True)
    for k in range(config.warmup_copy_steps):
        loss = step(*_copy_batch(random.Random(config.seed * 7919 + k), vocab, first_id, pad_token_id))
        summary.update(copy_steps=k + 1, copy_loss=loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (k + 1) % 100 == 0:
            log({"stage": "copy", "warmup_step": k + 1, "loss": loss})
        if loss < COPY_DONE_LOSS:
            break
    bar.close()
    bar = tqdm(total=config.warmup_sft_steps, desc="warm-up: SFT", disable=not progress, dynamic_ncols=True)
    for k in range(config.warmup_sft_steps):
        picked = random.Random(config.seed * 104729 + k).sample(examples, min(SFT_BATCH, len(examples)))
        loss = step(*_sft_batch(picked, pad_token_id))
        summary.update(sft_steps=k + 1, sft_loss=loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (k + 1) % 100 == 0:
            log({"stage": "sft", "warmup_step": k + 1, "loss": loss})
    bar.close()
    log({"stage": "done", **{k: v for k, v in summary.items() if v is not None}})
    model.train(was_training)
    return summary

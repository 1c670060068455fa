"""Held-out evaluation: preference accuracy (LOGO rewards) and retrieval exact match (greedy decoding).

* preference accuracy: the share of (example, rejected) pairs whose chosen reward is higher (a tie, equal
  within fp32 rounding, counts half), overall and per rejected slot (for the synthetic task slot 0 is
  the hallucination, slot 1 the unfollowing answer);
* exact match: the greedy continuation of the prompt (with the same synthesized positions as training,
  drawn from a fixed seed) equals the chosen response after stripping special tokens and whitespace.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .data.batching import PositionSynthesis, collate, prompt_positions
from .data.encoding import EncodedExample
from .objective import packed_logo_loss

EVAL_SEED = 1234
TIE_TOLERANCE = 1e-5  # rewards closer than fp32 rounding of a mean log-prob are a tie


@torch.no_grad()
def preference_metrics(model, examples: Sequence[EncodedExample], loss_fn, *, pad_token_id: int,
                       synthesis: PositionSynthesis, batch_rows: int = 4) -> Dict[str, float]:
    """Mean loss, margin and pair accuracy (overall and per rejected slot) over ``examples``."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(EVAL_SEED)
    losses, margins, wins = [], [], []
    for start in range(0, len(examples), batch_rows):
        batch = collate(examples[start:start + batch_rows], pad_token_id=pad_token_id, synthesis=synthesis,
                        generator=generator)
        out = packed_logo_loss(model, batch, loss_fn)
        n = len(batch.layouts)
        losses.append(float(out.loss) * n)
        margins.append(out.margins.float())
        chosen, rejected = out.chosen_rewards[:, None].double(), out.rejected_rewards.double()
        tie = (chosen - rejected).abs() <= TIE_TOLERANCE * chosen.abs().clamp_min(1.0)
        wins.append(torch.where(tie, 0.5, (chosen > rejected).double()))
    model.train(was_training)
    wins_all = torch.cat(wins)
    metrics = {"loss": sum(losses) / len(examples), "margin": float(torch.cat(margins).mean()),
               "accuracy": float(wins_all.mean())}
    for j in range(wins_all.shape[1]):
        metrics[f"accuracy_rejected_{j}"] = float(wins_all[:, j].mean())
    return metrics


@torch.no_grad()
def greedy_generate(model, prompt: List[int], positions: torch.Tensor, *, max_new_tokens: int,
                    stop_ids: Sequence[int] = (), device=None) -> List[int]:
    """Greedy continuation of ``prompt`` placed at ``positions`` (KV cache; new tokens continue after the
    last position). Stops at a token in ``stop_ids`` (kept) when given."""
    from transformers import DynamicCache

    device = device or next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    pos = positions[None].to(device)
    cache = DynamicCache()
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=device)
        pos = pos[:, -1:] + 1
    return out


def _collapsed_whitespace(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def retrieval_exact_match(model, tokenizer, examples: Sequence[EncodedExample], *, synthesis: PositionSynthesis,
                          max_new_tokens: int = 24, early_stop: bool = True) -> Dict[str, float]:
    """Share of examples whose greedy answer equals the chosen response (module doc). ``early_stop=False``
    always decodes ``max_new_tokens`` (ZeRO-3 ranks must run the same number of forwards)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(EVAL_SEED)
    stop = [tokenizer.eos_token_id] if early_stop and tokenizer.eos_token_id is not None else []
    hits = 0
    for example in examples:
        positions = prompt_positions(example, synthesis, generator)
        generated = greedy_generate(model, example.prompt, positions, max_new_tokens=max_new_tokens, stop_ids=stop)
        if tokenizer.eos_token_id in generated:  # the answer ends at the end-of-turn token
            generated = generated[:generated.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(generated, skip_special_tokens=True)
        gold = tokenizer.decode(example.responses[0], skip_special_tokens=True)
        hits += _collapsed_whitespace(answer) == _collapsed_whitespace(gold)
    model.train(was_training)
    return {"exact_match": hits / max(1, len(examples))}

"""The reference every shared-prefix packing test compares against: each ``[prefix | response]`` run alone through
the model's eager attention (which honours sliding windows, softcap and sinks), with the prefix's positions."""
import torch

from logo.attention import enable_shared_prefix_attention
from logo.data.packing import pack_rows


def separate_logps(model, prefixes, responses, positions):
    """Per-token log-probs of every response, each sequence run alone (eager attention, no padding)."""
    model.set_attn_implementation("eager")
    out = []
    for prefix, answers, pos in zip(prefixes, responses, positions):
        for answer in answers:
            ids = torch.cat([prefix, answer])[None]
            position_ids = torch.cat([pos, pos[-1] + 1 + torch.arange(answer.numel(), device=pos.device)])[None]
            logits = model(input_ids=ids, position_ids=position_ids, attention_mask=torch.ones_like(ids)).logits[0]
            predictors = logits[prefix.numel() - 1: prefix.numel() - 1 + answer.numel()]
            out.append(torch.log_softmax(predictors, -1).gather(1, answer[:, None]).squeeze(1))
    return torch.cat(out)


def packed_logps(model, batch):
    """Per-token log-probs of the scored tokens of packed rows, through the shared-prefix attention."""
    enable_shared_prefix_attention(model)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   shared_prefix_layouts=batch.layouts).logits
    scored = logits.reshape(-1, logits.shape[-1])[batch.score_index]
    return torch.log_softmax(scored, -1).gather(1, batch.targets[:, None]).squeeze(1)


def grads_of(model, objective):
    model.zero_grad(set_to_none=True)
    objective.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_separate(model, prefixes, responses, positions, device="cpu", tol=1e-5):
    """Packed rows give the separate sequences' per-token log-probs and every parameter gradient (rtol = atol =
    ``tol``) under a random per-token upstream gradient."""
    to = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    prefixes, positions, responses = to(prefixes), to(positions), [to(r) for r in responses]
    batch = pack_rows([p.cpu() for p in prefixes], [[a.cpu() for a in r] for r in responses],
                      prefix_positions=[p.cpu() for p in positions]).to(device)
    weights = torch.randn(batch.targets.numel(), generator=torch.Generator().manual_seed(1)).to(device)
    ref = separate_logps(model, prefixes, responses, positions)
    ref_grads = grads_of(model, (ref * weights).sum())
    ours = packed_logps(model, batch)
    our_grads = grads_of(model, (ours * weights).sum())
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    assert our_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(our_grads[key], ref_grads[key], rtol=tol, atol=tol, msg=key)

"""The HF helper gives the loss (and gradients) of computing the model's logits + the reference formula."""
import pytest
import torch
import torch.nn.functional as F

import logo_kernels as lk

transformers = pytest.importorskip("transformers")
from logo_kernels.integrations.hf import causal_lm_logo_loss, response_hidden_states  # noqa: E402

VOCAB = 97


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def preference_batch(batch=2, negatives=2, seed=0, extra_padding=0):
    """Rows [chosen, rejected_1..M] per example: shared prompt + response + right padding."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for _ in range(batch):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        for _ in range(negatives + 1):
            response = torch.randint(0, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            rows.append(torch.cat([prompt, response]))
            labels.append(torch.cat([torch.full_like(prompt, -100), response]))
    length = max(len(r) for r in rows) + extra_padding
    pad = lambda seqs, value: torch.stack([F.pad(s, (0, length - len(s)), value=value) for s in seqs])  # noqa: E731
    input_ids = pad(rows, 0)
    attention_mask = pad([torch.ones_like(r) for r in rows], 0)
    return input_ids, attention_mask, pad(labels, -100)


def reference_loss(model, input_ids, attention_mask, labels, *, negatives, beta, gamma, sft_weight):
    """The model's full logits, shifted log-softmax, per-row means, LOGO's formula."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logprobs = torch.log_softmax(logits[:, :-1], -1)
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps = logprobs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * mask
    means = (token_logps.sum(-1) / mask.sum(-1)).view(-1, negatives + 1)
    z = beta * (means[:, 0] - means[:, 1:].mean(1)) - gamma
    return (-F.logsigmoid(z) - sft_weight * means[:, 0]).mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("wrap", ["plain", "peft_lora"])
def test_helper_matches_model_logits_and_reference(wrap):
    model = tiny_llama()
    if wrap == "peft_lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "lm_head"]))
    input_ids, attention_mask, labels = preference_batch()
    kw = dict(beta=2.5, gamma=0.25, sft_weight=0.1)
    loss_fn = lk.LogoLoss(num_negatives=2, **kw)

    out = causal_lm_logo_loss(model, input_ids, labels, loss_fn, attention_mask=attention_mask)
    out.loss.backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference_loss(model, input_ids, attention_mask, labels, negatives=2, **kw)
    ref.backward()
    theirs = _grads(model)

    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    if wrap == "peft_lora":
        assert any("lm_head" in n for n in ours), "LoRA on lm_head must receive gradients"


def test_padding_does_not_change_the_loss():
    """Guards the authors' bug L3 (labels padded with token 0, counted in the means)."""
    model = tiny_llama()
    loss_fn = lk.LogoLoss(num_negatives=2)
    tight = causal_lm_logo_loss(model, *_ids_labels(preference_batch(extra_padding=0)), loss_fn,
                                attention_mask=preference_batch(extra_padding=0)[1])
    padded = causal_lm_logo_loss(model, *_ids_labels(preference_batch(extra_padding=5)), loss_fn,
                                 attention_mask=preference_batch(extra_padding=5)[1])
    torch.testing.assert_close(padded.loss, tight.loss, rtol=1e-5, atol=1e-6)


def _ids_labels(batch):
    input_ids, _, labels = batch
    return input_ids, labels


def test_response_hidden_states_shift_and_grouping():
    """hidden[t - 1] predicts labels[t] (guards L2: SFT without the causal shift); tokens grouped by sequence."""
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    labels = torch.tensor([[-100, 11, 12, -100, 14], [-100, -100, 21, 22, 23]])
    sequence_ids = torch.tensor([[0, 2, 2, 2, 0], [1, 1, 1, 1, 3]])  # a packed layout, out of order
    h, targets, cu = response_hidden_states(hidden, labels, sequence_ids, num_sequences=5)
    assert cu.tolist() == [0, 1, 3, 5, 6, 6]  # sequence 4 has no scored token
    assert targets.tolist() == [14, 21, 22, 11, 12, 23]
    assert h.squeeze(1).tolist() == [3.0, 6.0, 7.0, 0.0, 1.0, 8.0]  # the position before each label

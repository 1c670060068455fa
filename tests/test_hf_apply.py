"""hf.apply(model): model(input_ids, labels=...) returns the model's own causal-LM loss, computed by the fused op
(no [tokens, vocab] tensor), for many model families; generation is untouched; revert undoes it."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from logo_kernels.integrations import hf  # noqa: E402
from test_memory import LargestTensor  # noqa: E402

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def family(name: str):
    t = transformers
    torch.manual_seed(0)
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**SHAPE))
    if name == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**SHAPE))
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SHAPE))
    if name == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**SHAPE, head_dim=8))
    if name == "gemma2-softcap":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0))
    if name == "gemma3":
        return t.Gemma3ForCausalLM(t.Gemma3TextConfig(**SHAPE, head_dim=8, final_logit_softcapping=5.0))
    if name == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**SHAPE, pad_token_id=0))
    if name == "cohere-logit-scale":
        return t.CohereForCausalLM(t.CohereConfig(**SHAPE, logit_scale=0.25))
    if name == "granite-divides":  # logits / logits_scaling
        return t.GraniteForCausalLM(t.GraniteConfig(**SHAPE, logits_scaling=4.0))
    if name == "hyperclovax-multiplies":  # logits * logits_scaling (MuP)
        return t.HyperCLOVAXForCausalLM(t.HyperCLOVAXConfig(**SHAPE, logits_scaling=4.0))
    raise ValueError(name)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2-softcap", "gemma3", "phi3", "cohere-logit-scale",
            "granite-divides", "hyperclovax-multiplies"]


def batch(seed=0, rows=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[-1, 9:] = -100  # padding
    return ids, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fused_matches_own(model, ids, labels):
    """The model's own loss and gradients, then the same after ``hf.apply``: asserts they agree; returns the
    fused output and both gradient dicts."""
    ref = model(input_ids=ids, labels=labels)
    ref.loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    hf.apply(model)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    got = grads(model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    return out, got, expected


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_and_gradients_equal_the_models_own(name):
    model = family(name).float()
    ids, labels = batch()
    out, got, expected = fused_matches_own(model, ids, labels)
    assert out.logits is None
    assert got.keys() == expected.keys()
    hf.revert(model)
    assert model(input_ids=ids, labels=labels).logits is not None and not hf.is_applied(model)


def test_num_items_in_batch_and_shift_labels_follow_hugging_face():
    model = family("llama")
    ids, labels = batch()
    ref_sum = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    ref_shifted = model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    hf.apply(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss, ref_sum)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, shift_labels=shifted).loss, ref_shifted)
    all_ignored = torch.full_like(labels, -100)
    assert torch.isnan(model(input_ids=ids, labels=all_ignored).loss)  # as Hugging Face: mean of nothing


def test_generation_is_untouched_and_apply_is_idempotent():
    model = family("llama").eval()
    ids, _ = batch(rows=1)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    hf.apply(model)
    hf.apply(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], VOCAB)  # no labels: the original forward
    hf.revert(model)
    hf.revert(model)
    assert not hf.is_applied(model)


def test_peft_lora_on_the_head_is_exact():
    peft = pytest.importorskip("peft")
    base = family("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj", "lm_head"]))
    _, got, _ = fused_matches_own(model, *batch())
    assert any("lm_head" in k for k in got)


def test_no_tokens_times_vocab_tensor_is_allocated():
    config = transformers.LlamaConfig(vocab_size=20000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = hf.apply(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 20000, (4, 256))
    with LargestTensor() as mode:
        model(input_ids=ids, labels=ids).loss.backward()
    assert mode.largest < ids.numel() * 20000 // 4, f"{mode.op} returned {mode.largest} elements"


def test_router_loss_models_are_refused():
    model = family("llama")
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="router load-balancing loss"):
        hf.apply(model)


def test_a_hugging_face_trainer_run_gives_the_unpatched_losses(tmp_path):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, VOCAB, (14,), generator=g).tolist()} for _ in range(24)]
    for row in rows:
        row["labels"] = [-100] * 4 + row["input_ids"][4:]
    data = datasets.Dataset.from_list(rows)

    def run(patched):
        model = family("qwen2")
        if patched:
            hf.apply(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=4,
                                              gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
                                              logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                              seed=0, disable_tqdm=True, bf16=False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [(row["loss"], row["grad_norm"]) for row in trainer.state.log_history if "loss" in row]

    plain, fused = run(False), run(True)
    assert len(plain) == len(fused) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(plain, fused):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-5)


def test_filter_eps_reaches_the_op_and_bad_values_are_refused():
    """apply(model, filter_eps=...): the same loss, a backward that skips what is below eps (the tiny model's
    probabilities are ~1/1024 < 2^-7, so every 128-id block without the target is skipped), the exact gradients
    again after a re-apply without it; a bad value is refused before the model is touched."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(SHAPE, vocab_size=1024)))
    ids, labels = batch()
    exact = model(input_ids=ids, labels=labels)
    exact.loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="filter_eps must lie in"):
        hf.apply(model, filter_eps=0.5)
    assert not hf.is_applied(model)
    hf.apply(model, filter_eps=2.0**-7)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, exact.loss, rtol=1e-5, atol=1e-6)
    got = grads(model)
    assert not torch.allclose(got["lm_head.weight"], expected["lm_head.weight"], rtol=1e-4, atol=1e-6)
    hf.revert(model)
    model.zero_grad(set_to_none=True)
    hf.apply(model)
    model(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(grads(model)["lm_head.weight"], expected["lm_head.weight"], rtol=1e-4, atol=1e-6)

"""verl's fused-kernel path on our op, against the real verl (0.9.1, its own environment: `make test-verl`).

Op level: :class:`LogoFusedLinearForPPO` / :func:`logo_linear_cross_entropy` against verl's ``FusedLinearForPPO``
(outputs and gradients, fp32 1e-5) and against a float64 materialised reference (bf16 / fp16 by the tolerance
rule). Model level: tiny Llama and Qwen2 patched by verl's ``apply_monkey_patch`` give the same ``log_probs``,
``entropy`` and parameter gradients with and without ``enable()``, for each of verl's backends.
"""
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl lives in its own environment: make test-verl")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import assert_close_to_reference, materialized  # noqa: E402
from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402
from verl.utils.kernel import linear_cross_entropy as lce  # noqa: E402

import logo_kernels as lk  # noqa: E402
from logo_kernels.integrations import verl as logo_verl  # noqa: E402

VERL_MODULE = torch_functional.FusedLinearForPPO
BACKENDS = [b for b in ("cpp", "torch") if b in lk.available_backends()]


@pytest.fixture(autouse=True)
def verl_restored():
    """Every test leaves verl's kernels and the model classes as it found them (verl patches classes)."""
    from transformers import PhiForCausalLM

    classes = (LlamaForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM, PhiForCausalLM)
    forwards = {cls: cls.__dict__.get("forward") for cls in classes}
    yield
    logo_verl.disable()
    for cls, forward in forwards.items():
        cls.forward = forward
    assert torch_functional.FusedLinearForPPO is VERL_MODULE


def verl_outputs(module_cls, hidden, weight, ids, temperature, g_logp, g_entropy):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    log_probs, entropy = module_cls(impl_backend="torch").forward(hidden_states=h, vocab_weights=w, input_ids=ids,
                                                                 temperature=temperature)
    objective = 0
    if g_logp is not None:
        objective = objective + (log_probs.float() * g_logp).sum()
    if g_entropy is not None:
        objective = objective + (entropy.float() * g_entropy).sum()
    objective.backward()
    return log_probs, entropy, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (2, 9), (3, 1)])
@pytest.mark.parametrize("grads", ["both", "logp", "entropy"])
def test_module_equals_verls_kernel_fp32(backend, shape, grads):
    torch.manual_seed(0)
    V, D = 1003, 24
    hidden = torch.randn(*shape, D)  # LM-like scales (extreme ones: the fp64 test below, by the tolerance rule)
    weight = torch.randn(V, D) / D ** 0.5
    ids = torch.randint(0, V, shape)
    g_logp = torch.randn(shape) if grads in ("both", "logp") else None
    g_entropy = torch.randn(shape) if grads in ("both", "entropy") else None
    theirs = verl_outputs(VERL_MODULE, hidden, weight, ids, 0.7, g_logp, g_entropy)
    logo_verl.enable(backend=backend)
    ours = verl_outputs(torch_functional.FusedLinearForPPO, hidden, weight, ids, 0.7, g_logp, g_entropy)
    assert torch_functional.FusedLinearForPPO is logo_verl.LogoFusedLinearForPPO
    for name, a, b in zip(("log_probs", "entropy", "d_hidden", "d_weight"), ours, theirs):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5, msg=name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), v=st.integers(1, 700), d=st.integers(1, 33),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]), scale=st.sampled_from([0.1, 1.0, 8.0]),
       with_entropy_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_module_against_fp64_by_the_tolerance_rule(n, v, d, dtype, temperature, scale, with_entropy_grad, seed):
    """fp32 / bf16 / fp16: error vs float64 <= error of the naive same-dtype computation + tol (log-probs,
    entropy, both gradients); and verl's own kernel on the same inputs where it runs (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=generator) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=generator) / d ** 0.5).to(dtype)
    ids = torch.randint(0, v, (n,), generator=generator)
    g_logp = torch.randn(n, generator=generator)
    g_entropy = torch.randn(n, generator=generator) if with_entropy_grad else None
    kw = dict(grad_logp=g_logp, grad_entropy=g_entropy, temperature=temperature)
    truth = materialized(hidden, weight, ids, **kw)
    naive = materialized(hidden, weight, ids, dtype=None, **kw)
    logo_verl.enable(backend=BACKENDS[0])
    log_probs, entropy, d_hidden, d_weight = verl_outputs(torch_functional.FusedLinearForPPO, hidden, weight, ids,
                                                          temperature, g_logp, g_entropy)
    ours = type(truth)(log_probs, truth.lse, d_hidden, d_weight, None, {"entropy": entropy})
    assert_close_to_reference(ours, truth, naive, dtype, names=("logp", "entropy", "d_hidden", "d_weight"))


def test_linear_cross_entropy_contract():
    """The triton backend's drop-in: flat fp32 outputs, verl's reductions, refusals named."""
    torch.manual_seed(1)
    V, D = 301, 16
    hidden = torch.randn(2, 5, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    ids = torch.randint(0, V, (2, 5))
    logo_verl.enable()
    assert lce.linear_cross_entropy is logo_verl.logo_linear_cross_entropy
    log_probs, entropy = lce.linear_cross_entropy(hidden, weight, ids, 0.9, "none")
    ref_lp, ref_entropy, _, _ = verl_outputs(VERL_MODULE, hidden, weight, ids, 0.9, torch.ones(2, 5), None)
    assert log_probs.shape == entropy.shape == (10,)
    torch.testing.assert_close(log_probs, ref_lp.reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy.reshape(-1).float(), atol=1e-5, rtol=1e-5)
    total, _ = lce.linear_cross_entropy(hidden, weight, ids, 0.9, "sum")
    mean, _ = lce.linear_cross_entropy(hidden, weight, ids, 0.9, "mean")
    torch.testing.assert_close(total, log_probs.sum())
    torch.testing.assert_close(mean, log_probs.mean())
    with pytest.raises(ValueError, match="dist_process_group"):
        lce.linear_cross_entropy(hidden, weight, ids, 0.9, "none", object())
    with pytest.raises(ValueError, match="reduction"):
        lce.linear_cross_entropy(hidden, weight, ids, 0.9, "avg")
    with pytest.raises(TypeError, match="per-sample temperature"):
        lce.linear_cross_entropy(hidden, weight, ids, torch.tensor([0.9]), "none")
    with pytest.raises(ValueError, match="targets\\[1, 2\\] = 301"):
        bad = ids.clone()
        bad[1, 2] = V
        lce.linear_cross_entropy(hidden, weight, bad, 0.9, "none")
    with pytest.raises(ValueError, match="must match hidden_states"):
        lce.linear_cross_entropy(hidden, weight, ids[:, :4], 0.9, "none")


TINY = dict(vocab_size=501, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny(family: str):
    torch.manual_seed(3)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False, attn_implementation="sdpa"))
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True, attn_implementation="sdpa"))


def patched_run(family, verl_backend, ids, position_ids, *, shift_labels=None):
    """verl's patched forward (its label rolling, temperature) -> (log_probs, entropy, grads by name)."""
    model = tiny(family)
    monkey_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                                    fused_kernels_backend=verl_backend)
    out = model(input_ids=ids, position_ids=position_ids, temperature=0.8, return_dict=True, use_cache=False,
                shift_labels=shift_labels)
    g = torch.Generator().manual_seed(5)
    (out.log_probs.float() * torch.randn(out.log_probs.shape, generator=g)).sum().backward(retain_graph=True)
    (0.1 * out.entropy.float().sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.reshape(ids.shape).detach(), out.entropy.reshape(ids.shape).detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("verl_backend", ["torch", "liger", "triton"])
def test_patched_model_equals_verls_own_kernel(family, verl_backend):
    """verl's triton kernel needs CUDA (NVTX, Triton on CUDA tensors): on CPU the reference of the triton
    backend is verl's torch kernel, the same mathematics; liger's is what verl runs for "liger" here."""
    torch.manual_seed(4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    position_ids = torch.arange(11).expand(2, 11)
    reference_backend = "torch" if verl_backend == "triton" else verl_backend
    if verl_backend == "liger":  # verl falls back to its torch kernel, silently, where Liger is not installed
        assert torch_functional._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is not None, "make verl-env installs Liger"
    packed_ids, packed_positions = ids.reshape(1, -1), torch.cat([position_ids[0]] * 2)[None]
    shift_labels = torch.roll(packed_ids, -1, -1)  # the engine's remove-padding labels, rolled over the packed row
    theirs = patched_run(family, reference_backend, ids, position_ids)
    theirs_packed = patched_run(family, reference_backend, packed_ids, packed_positions, shift_labels=shift_labels)
    with logo_verl.enabled():
        ours = patched_run(family, verl_backend, ids, position_ids)
        ours_packed = patched_run(family, verl_backend, packed_ids, packed_positions, shift_labels=shift_labels)
    for a, b in ((ours, theirs), (ours_packed, theirs_packed)):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1].float(), atol=1e-5, rtol=1e-5)
        assert a[2].keys() == b[2].keys() and len(a[2]) > 10
        for name in b[2]:
            torch.testing.assert_close(a[2][name], b[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_model_whose_logits_verl_would_drop_is_refused():
    """Gemma 2 softcaps its logits after the head; verl's fused forward multiplies by lm_head.weight alone: with
    logits of ~24 before the cap (trained models reach that), verl's own fused log-probs are off by nats."""
    model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=30.0,
                                           attn_implementation="eager"))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(input_ids=ids).logits.float().log_softmax(-1)
        own = own.gather(-1, torch.roll(ids, -1, -1)[..., None]).squeeze(-1)
        monkey_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                                        fused_kernels_backend="torch")
        verls = model(input_ids=ids, temperature=1.0, return_dict=True, use_cache=False).log_probs
    assert (verls - own).abs().max() > 1.0  # what the refusal prevents
    with logo_verl.enabled():
        with pytest.raises(ValueError, match="gemma2 .*final_logit_softcapping=30.0.*use_fused_kernels=False"):
            monkey_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                                            fused_kernels_backend="torch")
        monkey_patch.apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=False)  # unfused: fine


def test_a_bias_on_the_head_and_a_lora_head_added_after_patching_are_refused():
    """Phi's lm_head has a bias (verl passes the weight alone); verl's engine adds LoRA after apply_monkey_patch,
    so a LoRA adapter on lm_head is refused at the forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=501, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64))
    ids = torch.randint(0, 501, (1, 8))
    with logo_verl.enabled():
        with pytest.raises(ValueError, match="a bias on lm_head"):
            monkey_patch.apply_monkey_patch(phi, use_remove_padding=False, use_fused_kernels=True,
                                            fused_kernels_backend="torch")
        llama = tiny("llama")
        monkey_patch.apply_monkey_patch(llama, use_remove_padding=False, use_fused_kernels=True,
                                        fused_kernels_backend="torch")
        llama(input_ids=ids, temperature=1.0, return_dict=True, use_cache=False)  # fine before LoRA
        lora = get_peft_model(llama, LoraConfig(r=2, target_modules=["lm_head", "q_proj"], lora_dropout=0.0))
        with pytest.raises(ValueError, match="a LoRA adapter on lm_head"):
            lora(input_ids=ids, temperature=1.0, return_dict=True, use_cache=False)


def test_enable_disable_and_version_check(monkeypatch):
    saved = (torch_functional.FusedLinearForPPO, lce.linear_cross_entropy, monkey_patch.patch_forward_with_backends)
    with logo_verl.enabled():
        assert logo_verl.is_enabled()
        logo_verl.enable()  # idempotent: disable still restores verl's own
        assert monkey_patch.patch_forward_with_backends.__wrapped__ is saved[2]
    assert not logo_verl.is_enabled()
    assert (torch_functional.FusedLinearForPPO, lce.linear_cross_entropy,
            monkey_patch.patch_forward_with_backends) == saved
    monkeypatch.setattr(verl, "__version__", "0.0.1")
    with pytest.raises(RuntimeError, match="verl 0.0.1 is not a tested version"):
        logo_verl.enable()
    with pytest.warns(RuntimeWarning, match="verl 0.0.1"):
        logo_verl.enable(allow_untested=True)
    assert logo_verl.is_enabled()


def test_filter_eps_reaches_the_op_from_enable_and_from_the_environment(monkeypatch):
    """enable(filter_eps=...) and LOGO_VERL_FILTER_EPS (the Ray workers' route) give the op's filtered gradients;
    disable() drops the option; bad values are refused naming them."""
    import importlib

    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(40, 16, generator=g), torch.randn(600, 16, generator=g)
    ids = torch.randint(0, 600, (40,), generator=g)
    g_logp, g_entropy = torch.randn(40, generator=g), torch.randn(40, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = lk.linear_logprobs(h, w, ids, outputs=("logp", "entropy"), temperature=0.8, filter_eps=2.0**-7)
    (stats.logp * g_logp + stats.entropy * g_entropy).sum().backward()
    exact = verl_outputs(logo_verl.LogoFusedLinearForPPO, hidden, weight, ids, 0.8, g_logp, g_entropy)
    for route in ("enable", "environment"):
        if route == "enable":
            logo_verl.enable(filter_eps=2.0**-7)
        else:
            monkeypatch.setenv("LOGO_VERL_FILTER_EPS", str(2.0**-7))
            importlib.reload(importlib.import_module("logo_kernels.integrations.verl_autoenable"))
        ours = verl_outputs(torch_functional.FusedLinearForPPO, hidden, weight, ids, 0.8, g_logp, g_entropy)
        torch.testing.assert_close(ours[2], h.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[3], w.grad, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ours[3], exact[3], rtol=1e-6, atol=1e-6), "nothing skipped"
        logo_verl.disable()
    again = verl_outputs(logo_verl.LogoFusedLinearForPPO, hidden, weight, ids, 0.8, g_logp, g_entropy)
    torch.testing.assert_close(again[3], exact[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="filter_eps must lie in"):
        logo_verl.enable(filter_eps=1.0)
    monkeypatch.setenv("LOGO_VERL_FILTER_EPS", "tiny")
    with pytest.raises(ValueError, match="LOGO_VERL_FILTER_EPS must be 'auto' or a float, got 'tiny'"):
        importlib.reload(importlib.import_module("logo_kernels.integrations.verl_autoenable"))

"""TRL's real trainers on logo_kernels: every logged loss and metric of every step equals the same run on TRL's own
kernel (fp32; TRL's kernel and ours differ only in rounding), plus the op-level contract of the kernel swap."""
import math
import os

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from logo.data.tokenizer import default_tokenizer  # noqa: E402
import logo_kernels  # noqa: E402
from logo_kernels.integrations import trl as logo_trl  # noqa: E402

STEPS = 3
REL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(autouse=True)
def trl_kernel_restored():
    yield
    logo_trl.disable()


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama: GRPO / RLOO with a KL term build their reference model from the policy's path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def common_args(tmp_path, name):
    # bf16=False: TRL's configs default to bf16, i.e. CPU autocast, under which TRL's kernel multiplies in bf16
    return dict(output_dir=str(tmp_path / name), max_steps=STEPS, logging_steps=1, report_to=[], seed=0, use_cpu=True,
                bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


def logged(trainer):
    """Every numeric metric of every logged step, timings aside."""
    return [{k: v for k, v in row.items() if isinstance(v, (int, float)) and "time" not in k and "per_second" not in k}
            for row in trainer.state.log_history if "train_runtime" not in row]


def assert_same_logs(theirs, ours):
    assert len(theirs) == len(ours) == STEPS
    for step, (a, b) in enumerate(zip(theirs, ours), 1):
        assert a.keys() == b.keys(), step
        for key in a:
            if math.isnan(a[key]):
                assert math.isnan(b[key]), (step, key)
                continue
            assert b[key] == pytest.approx(a[key], rel=REL, abs=1e-6), f"step {step}: {key} {b[key]} vs {a[key]}"


def both_kernels(run):
    """run() once on TRL's kernel, once on ours; returns (theirs, ours, calls of our kernel)."""
    logo_trl.disable()
    theirs = run()
    calls = {"n": 0}
    real = logo_trl.LogoChunkedLogProb.apply.__func__

    def counted(cls, *args, **kwargs):
        calls["n"] += 1
        return real(cls, *args, **kwargs)

    logo_trl.enable()
    logo_trl.LogoChunkedLogProb.apply = classmethod(counted)
    try:
        ours = run()
    finally:
        logo_trl.LogoChunkedLogProb.apply = classmethod(real)
    return theirs, ours, calls["n"]


def preference_rows(n=16):
    return [{"prompt": f"Question {i}: what colour is the sky over the harbour?", "chosen": " It is blue today.",
             "rejected": " Green, or maybe red." if i % 2 else " It is purple."} for i in range(n)]


@pytest.mark.parametrize("adapter", ["full", "peft_lora"])
def test_dpo_trainer_sigmoid(tmp_path, tokenizer, adapter):
    """Full fine-tuning with a reference model, and a LoRA policy (its reference is the policy with the adapter
    disabled; the head is frozen, so our op takes its gradient-basis path)."""
    data = datasets.Dataset.from_list(preference_rows())

    def run():
        args = trl.DPOConfig(**common_args(tmp_path, "dpo"), per_device_train_batch_size=4, learning_rate=1e-2,
                             beta=0.1, loss_type=["sigmoid"])
        kwargs = {"ref_model": tiny_llama(tokenizer)}
        if adapter == "peft_lora":
            peft = pytest.importorskip("peft")
            kwargs = {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"])}
        trainer = trl.DPOTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=data,
                                 processing_class=tokenizer, **kwargs)
        trainer.train()
        return logged(trainer)

    theirs, ours, calls = both_kernels(run)
    assert calls >= 2 * STEPS  # policy and reference
    assert {"loss", "grad_norm", "entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins"} <= ours[0].keys()
    assert_same_logs(theirs, ours)


def reward_length(completions, **kwargs):
    """A rule-based reward: prefer completions near 12 characters."""
    return [-abs(len(c) - 12) / 12.0 for c in completions]


def test_grpo_trainer_with_entropy_bonus_and_high_entropy_mask(tmp_path, tokenizer, model_dir):
    data = datasets.Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])

    def run():
        args = trl.GRPOConfig(**common_args(tmp_path, "grpo"), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=6, learning_rate=1e-2, temperature=0.9, beta=0.04,
                              entropy_coef=0.05, top_entropy_quantile=0.5, generation_kwargs={"do_sample": True})
        trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=reward_length, args=args, train_dataset=data,
                                  processing_class=tokenizer)
        torch.manual_seed(0)  # generation samples from torch's RNG
        trainer.train()
        return logged(trainer)

    theirs, ours, calls = both_kernels(run)
    assert calls >= STEPS
    assert {"loss", "entropy", "kl", "reward"} <= ours[0].keys()
    assert_same_logs(theirs, ours)


def test_kto_trainer(tmp_path, tokenizer):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
            for i, r in enumerate(preference_rows())]
    data = datasets.Dataset.from_list(rows)

    def run():
        args = trl.KTOConfig(**common_args(tmp_path, "kto"), per_device_train_batch_size=4, learning_rate=1e-2)
        trainer = trl.KTOTrainer(model=tiny_llama(tokenizer), ref_model=tiny_llama(tokenizer), args=args,
                                 train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return logged(trainer)

    theirs, ours, calls = both_kernels(run)
    assert calls >= STEPS
    assert_same_logs(theirs, ours)


def test_rloo_trainer(tmp_path, tokenizer, model_dir):
    data = datasets.Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])

    def run():
        args = trl.RLOOConfig(**common_args(tmp_path, "rloo"), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=6, learning_rate=1e-2, beta=0.05,
                              generation_kwargs={"do_sample": True})
        trainer = trl.RLOOTrainer(model=model_dir, reward_funcs=reward_length, args=args, train_dataset=data,
                                  processing_class=tokenizer)
        torch.manual_seed(0)
        trainer.train()
        return logged(trainer)

    theirs, ours, calls = both_kernels(run)
    assert calls >= STEPS
    assert_same_logs(theirs, ours)


def test_sft_trainer(tmp_path, tokenizer):
    data = datasets.Dataset.from_list([{"text": f"The keeper {i} painted the lighthouse tower crimson in 18{i:02d}."}
                                       for i in range(16)])

    def run():
        args = trl.SFTConfig(**common_args(tmp_path, "sft"), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_length=64)
        trainer = trl.SFTTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return logged(trainer)

    theirs, ours, calls = both_kernels(run)
    assert calls >= STEPS
    assert_same_logs(theirs, ours)


# ---- op level: the swapped kernel's contract ------------------------------------------------------------------
def _kernel_outputs(kernel, hidden, weight, bias, targets, upstream):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    outputs = kernel.apply(h, w, b, targets, 0.7, 256, 5.0, 1.3,
                           ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    (outputs[0] * upstream[0] + outputs[1] * upstream[1]).sum().backward()
    return [o.detach() for o in outputs] + [h.grad, w.grad, b.grad]


def test_all_outputs_and_gradients_equal_trls_kernel():
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(300, 32, generator=g), torch.randn(1000, 32, generator=g) * 0.3, \
        torch.randn(1000, generator=g)
    targets = torch.randint(0, 1000, (300,), generator=g)
    upstream = torch.randn(300, generator=g), torch.randn(300, generator=g)
    theirs = _kernel_outputs(ChunkedLogProbFunction, hidden, weight, bias, targets, upstream)
    ours = _kernel_outputs(logo_trl.LogoChunkedLogProb, hidden, weight, bias, targets, upstream)
    names = ["log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "d_hidden", "d_weight", "d_bias"]
    for name, a, b in zip(names, theirs, ours):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6, msg=name)


def test_filter_eps_reaches_the_op_and_bad_values_are_refused_at_enable():
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = torch.randn(64, 16, generator=g), torch.randn(500, 16, generator=g), \
        torch.randn(500, generator=g)
    targets = torch.randint(0, 500, (64,), generator=g)
    upstream = torch.randn(64, generator=g), torch.randn(64, generator=g)
    exact = _kernel_outputs(logo_trl.LogoChunkedLogProb, hidden, weight, bias, targets, upstream)
    with logo_trl.enabled(filter_eps=2.0**-7):
        filtered = _kernel_outputs(logo_trl.LogoChunkedLogProb, hidden, weight, bias, targets, upstream)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    stats = logo_kernels.linear_logprobs(h, w, targets, b, outputs=("logp", "entropy"), filter_eps=2.0**-7,
                                         temperature=0.7, softcap=5.0, logit_scale=1.3)  # as _kernel_outputs
    (stats.logp * upstream[0] + stats.entropy * upstream[1]).sum().backward()
    for name, ours, op in (("d_hidden", filtered[5], h.grad), ("d_weight", filtered[6], w.grad),
                           ("d_bias", filtered[7], b.grad)):
        torch.testing.assert_close(ours, op, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.allclose(filtered[6], exact[6], rtol=1e-6, atol=1e-6), "nothing skipped: the test tests nothing"
    assert logo_trl.LogoChunkedLogProb.filter_eps is None  # the block's option ends with the block
    with pytest.raises(ValueError, match="filter_eps must lie in"):
        logo_trl.enable(filter_eps=0.5)
    assert not logo_trl.is_enabled()


def test_outputs_not_asked_for_are_none_and_the_frozen_head_takes_no_weight_gradient():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    out = logo_trl.LogoChunkedLogProb.apply(hidden, weight, None, torch.randint(0, 20, (10,)), 1.0, 32768, None, 1.0,
                                            ("log_probs",))
    assert out[0].shape == (10,) and all(o is None for o in out[1:])
    out[0].sum().backward()
    assert hidden.grad is not None


def test_enable_disable_and_version_check(monkeypatch):
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    with logo_trl.enabled():
        assert trl_utils._ChunkedLogProbFunction is logo_trl.LogoChunkedLogProb and logo_trl.is_enabled()
    assert trl_utils._ChunkedLogProbFunction is original and not logo_trl.is_enabled()
    logo_trl.enable()
    logo_trl.enable()  # idempotent: disable still restores TRL's own
    logo_trl.disable()
    assert trl_utils._ChunkedLogProbFunction is original
    monkeypatch.setattr(trl, "__version__", "0.9.0")
    with pytest.raises(RuntimeError, match=r"TRL 0.9.0 is not a tested version \(1.16.0\)"):
        logo_trl.enable()
    with pytest.warns(RuntimeWarning, match="not a tested version"):
        logo_trl.enable(allow_untested=True)
    logo_trl.disable()

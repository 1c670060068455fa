"""On a CUDA device (``make gpu-check``): every backend mode against the float64 reference at bf16 / fp16 / fp32,
including N·V > 2^31, determinism, the autotuned tiles, memory bounds, and the losses / HF integration on GPU.
Skipped, with the reason, where no CUDA device exists."""
import os

import pytest
import torch

import logo_kernels as lk
from reference import assert_close_to_reference, materialized

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OUTPUTS = ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def inputs(n, vocab, dim, dtype, seed=0, scale=3.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (scale / dim ** 0.5)
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    cast = lambda t: None if t is None else t.to(device=CUDA, dtype=dtype)  # noqa: E731
    grads = torch.randn(n, generator=g).to(CUDA), torch.randn(n, generator=g).to(CUDA)
    return cast(hidden), cast(weight), targets.to(CUDA), cast(b), grads


def fused(hidden, weight, targets, bias, grads, *, train_head=True, **kwargs):
    from reference import Result

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_head)
    b = None if bias is None else bias.detach().clone().requires_grad_(train_head)
    out = lk.linear_logprobs(h, w, targets, b, outputs=OUTPUTS, **kwargs)
    ((out.logp * grads[0]).sum() + (out.entropy * grads[1]).sum()).backward()
    stats = {k: getattr(out, k).detach() for k in ("entropy", "log_sum_sq_probs", "mean_logits")}
    return Result(out.logp.detach(), out.lse.detach(), h.grad, w.grad, None if b is None else b.grad, stats)


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "one-recompute"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", [{}, dict(temperature=0.7, softcap=20.0, logit_scale=1.5)], ids=["plain", "all"])
def test_triton_matches_float64(dtype, deterministic, head, transform):
    hidden, weight, targets, bias, grads = inputs(2048, 32003, 256, dtype)
    kw = dict(grad_logp=grads[0], grad_entropy=grads[1], **transform)
    truth = materialized(hidden, weight, targets, bias, dtype=torch.float64, **kw)
    naive = materialized(hidden, weight, targets, bias, dtype=None, **kw)
    ours = fused(hidden, weight, targets, bias, grads, train_head=head == "trainable", backend="triton",
                 deterministic=deterministic, **transform)
    names = ("logp", "lse", "d_hidden", "entropy", "log_sum_sq_probs", "mean_logits") + (
        ("d_weight", "d_bias") if head == "trainable" else ())
    assert_close_to_reference(ours, truth, naive, dtype, names=names)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_on_cuda(dtype):
    hidden, weight, targets, bias, grads = inputs(512, 5000, 128, dtype)
    kw = dict(grad_logp=grads[0], grad_entropy=grads[1])
    truth = materialized(hidden, weight, targets, bias, dtype=torch.float64, **kw)
    naive = materialized(hidden, weight, targets, bias, dtype=None, **kw)
    assert_close_to_reference(fused(hidden, weight, targets, bias, grads, backend="torch"), truth, naive, dtype)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "one-recompute"])
def test_more_than_2_pow_31_logits(deterministic):
    """N·V > 2^31: 64-bit offsets in every kernel; the reference is computed a block of rows at a time."""
    n, vocab, dim = 66_000, 32_768, 16
    hidden, weight, targets, _, grads = inputs(n, vocab, dim, torch.float32, bias=False)
    targets[-8:] = torch.arange(vocab - 8, vocab, device=CUDA)
    ours = fused(hidden, weight, targets, None, (grads[0], torch.zeros_like(grads[1])), backend="triton",
                 deterministic=deterministic)
    w64 = weight.double()
    d_weight = torch.zeros_like(w64)
    for start in range(0, n, 4096):
        rows = slice(start, start + 4096)
        t = targets[rows]
        keep = t != -100
        logits = hidden[rows].double() @ w64.T
        lse = torch.logsumexp(logits, 1)
        logp = torch.where(keep, logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1) - lse, 0.0)
        torch.testing.assert_close(ours.logp[rows].double(), logp, rtol=1e-5, atol=1e-4)
        g = torch.where(keep, grads[0][rows].double(), 0.0)
        grad_logits = torch.exp(logits - lse[:, None]) * -g[:, None]
        grad_logits.scatter_add_(1, t.clamp_min(0)[:, None], g[:, None])
        torch.testing.assert_close(ours.d_hidden[rows].double(), grad_logits @ w64, rtol=1e-4, atol=1e-4)
        d_weight += grad_logits.T @ hidden[rows].double()
    torch.testing.assert_close(ours.d_weight.double(), d_weight, rtol=1e-4, atol=1e-3)


def test_deterministic_backward_is_bitwise_reproducible():
    hidden, weight, targets, bias, grads = inputs(4096, 32000, 512, torch.bfloat16)
    first = fused(hidden, weight, targets, bias, grads, backend="triton", deterministic=True)
    second = fused(hidden, weight, targets, bias, grads, backend="triton", deterministic=True)
    for name, value in first.tensors().items():
        assert torch.equal(value, second.tensors()[name]), name


def test_autotuned_tiles_give_the_same_results(monkeypatch):
    hidden, weight, targets, bias, grads = inputs(1024, 8192, 256, torch.bfloat16)
    default = fused(hidden, weight, targets, bias, grads, backend="triton")
    monkeypatch.setenv("LOGO_KERNELS_AUTOTUNE", "1")
    tuned = fused(hidden, weight, targets, bias, grads, backend="triton")
    for name, value in default.tensors().items():
        torch.testing.assert_close(tuned.tensors()[name].float(), value.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_no_tokens_times_vocab_allocation(head):
    """Peak CUDA memory of fwd + bwd: inputs, outputs and gradients plus a bounded workspace — far below one
    [N, V] logits tensor."""
    n, vocab, dim = 8192, 128256, 1024
    hidden, weight, targets, _, grads = inputs(n, vocab, dim, torch.bfloat16, bias=False)
    h = hidden.requires_grad_()
    w = weight.requires_grad_(head == "trainable")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (lk.linear_logprobs(h, w, targets, backend="triton") * grads[0]).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    gradients = (vocab * dim * 4 if head == "trainable" else 0) + n * dim * 4 * 2  # fp32 accumulators, bf16 copies
    logits = n * vocab * 2
    assert extra <= gradients + 64 * 2**20, f"{extra / 2**20:.0f} MiB (one logits tensor: {logits / 2**20:.0f} MiB)"


def test_logo_loss_and_hf_apply_on_cuda():
    transformers = pytest.importorskip("transformers")
    from logo_kernels.integrations import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(CUDA)
    ids = torch.randint(0, 4000, (4, 256), device=CUDA)
    labels = ids.clone()
    labels[:, :64] = -100
    expected = model(input_ids=ids, labels=labels).loss
    hf.apply(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, expected, rtol=1e-4, atol=1e-5)
    hidden, weight, targets, _, _ = inputs(3 * 64, 4000, 256, torch.float32, bias=False)
    cu = torch.tensor([0, 64, 128, 192], device=CUDA)
    out = lk.logo_loss(hidden, weight, targets.clamp_min(0), cu, num_negatives=2)
    assert torch.isfinite(out.loss)


def test_the_cpu_suite_does_not_run_interpreted_triton_here():
    from conftest import CPU_BACKENDS

    assert "triton" not in CPU_BACKENDS and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.parametrize("backend", ["exact", "flex"])
@pytest.mark.parametrize("name", ["mistral-sliding", "gemma2", "gemma3", "gpt-oss"])
def test_shared_prefix_attention_on_cuda_equals_separate_sequences(name, backend):
    """The packed = separate matrix on CUDA for both attention paths (flex: its gradients, which CPU cannot run;
    sinks take the exact path). fp32, 1e-5 — the gate before flex may become the CUDA default."""
    from logo.attention import enable_shared_prefix_attention
    from model_zoo import build
    from packed_reference import assert_packed_equals_separate
    from test_attention_zoo import examples

    model = build(name).to(CUDA)
    enable_shared_prefix_attention(model, backend=backend)
    try:
        assert_packed_equals_separate(model, *examples(), device=CUDA)
    finally:
        enable_shared_prefix_attention(model, backend="exact")

"""Fused linear -> log-prob op vs a float64 materialised reference: forward and every gradient."""
import functools
import os

import math

import pytest
import torch

import logo_kernels as lk
from reference import Result, assert_close_to_reference, materialized, top1_margin

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(n, vocab, dim, *, dtype=torch.float32, bias=True, ignore_frac=0.1, logit_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g)
    # Scale so that logits have standard deviation ~logit_scale whatever D is.
    weight = torch.randn(vocab, dim, generator=g) * (logit_scale / max(dim, 1) ** 0.5)
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    grad_logp = torch.randn(n, generator=g)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets, cast(b), grad_logp


ALL_OUTPUTS = ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def run_fused(hidden, weight, targets, bias, grad_logp, grad_lse=None, train_head=True, grad_entropy=None,
              outputs=ALL_OUTPUTS, **kwargs) -> Result:
    """Fused op with autograd, every output asked for (or ``outputs``, which must hold logp, lse and entropy);
    ``train_head=False`` freezes weight and bias (LoRA): their grads are None. The objective is
    sum(g * logp + g_lse * lse + g_H * entropy)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_head)
    b = None if bias is None else bias.detach().clone().requires_grad_(train_head)
    out = lk.linear_logprobs(h, w, targets, b, outputs=outputs, **kwargs)
    assert out.logp.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert out.is_top1 is None or out.is_top1.dtype == torch.bool
    assert not any(x is not None and x.requires_grad for x in (out.log_sum_sq_probs, out.mean_logits, out.is_top1))
    objective = (out.logp * grad_logp).sum()
    if grad_lse is not None:
        objective = objective + (out.lse * grad_lse).sum()
    if grad_entropy is not None:
        objective = objective + (out.entropy * grad_entropy).sum()
    objective.backward()
    for grad, src in ((h.grad, hidden), (w.grad, weight), (None if b is None else b.grad, bias)):
        if grad is not None:
            assert grad.dtype == src.dtype, "gradients must come back in the input dtype"
    stats = {name: getattr(out, name).detach() for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
             if getattr(out, name) is not None}
    return Result(out.logp.detach(), out.lse.detach(), h.grad, w.grad, None if b is None else b.grad, stats)


def assert_top1_matches(ours: Result, truth: Result, hidden, weight, bias, **transform):
    """is_top1 equals fp64's wherever the two largest logits are not within fp32 rounding of each other."""
    margin = top1_margin(hidden, weight, bias, **transform).reshape(ours.logp.shape)
    clear = margin > 1e-4 * (1 + truth.lse.abs())
    assert torch.equal(ours.stats["is_top1"][clear], truth.stats["is_top1"][clear]), "is_top1 differs"


STATS = ("entropy", "log_sum_sq_probs", "mean_logits")


@functools.lru_cache(maxsize=8)
def references(n, vocab, dim, dtype, bias, temperature, softcap, with_lse_grad, seed=0, logit_scale=1.0,
               with_entropy_grad=False):
    """(inputs, fp64 truth, naive same-dtype) for one case; shared by the backends."""
    hidden, weight, targets, b, grad_logp = make_inputs(n, vocab, dim, dtype=dtype, bias=bias, seed=seed)
    grad_lse = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if with_lse_grad else None
    grad_entropy = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if with_entropy_grad else None
    kw = dict(grad_logp=grad_logp, grad_lse=grad_lse, grad_entropy=grad_entropy, temperature=temperature,
              softcap=softcap, logit_scale=logit_scale)
    truth = materialized(hidden, weight, targets, b, dtype=torch.float64, **kw)
    naive = materialized(hidden, weight, targets, b, dtype=None, **kw)
    return (hidden, weight, targets, b, grad_logp, grad_lse, grad_entropy), truth, naive


@pytest.mark.parametrize("dim", [1, 8, 64])
@pytest.mark.parametrize("vocab", [1, 17, 1000, 32003])
@pytest.mark.parametrize("n", [1, 7, 257, 1000])
def test_shape_matrix_fp32(backend, n, vocab, dim):
    (hidden, weight, targets, b, g, _, _), truth, naive = references(n, vocab, dim, torch.float32, True, 1.0, None,
                                                                     False)
    ours = run_fused(hidden, weight, targets, b, g, backend=backend)
    assert_close_to_reference(ours, truth, naive, torch.float32, names=("logp", "lse", "d_hidden", "d_weight",
                                                                         "d_bias") + STATS)
    assert_top1_matches(ours, truth, hidden, weight, b)


OPTIONS = {
    "plain": dict(bias=False, temperature=1.0, softcap=None, with_lse_grad=False),
    "bias": dict(bias=True, temperature=1.0, softcap=None, with_lse_grad=False),
    "temperature": dict(bias=True, temperature=0.7, softcap=None, with_lse_grad=False),
    "softcap": dict(bias=False, temperature=1.0, softcap=4.0, with_lse_grad=False),
    "logit_scale": dict(bias=True, temperature=1.0, softcap=None, with_lse_grad=False, logit_scale=0.4),
    "entropy_grad": dict(bias=True, temperature=1.0, softcap=None, with_lse_grad=False, with_entropy_grad=True),
    "everything": dict(bias=True, temperature=1.3, softcap=6.0, with_lse_grad=True, logit_scale=2.5,
                       with_entropy_grad=True),
}


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_options(backend, dtype, option, head):
    """Every output and gradient vs fp64; a frozen head (LoRA) takes the gradient-basis path (with an entropy
    gradient: the recomputing one): same results, no weight/bias gradients."""
    opts = OPTIONS[option]
    (hidden, weight, targets, b, g, g_lse, g_ent), truth, naive = references(257, 1000, 64, dtype, **opts)
    transform = dict(temperature=opts["temperature"], softcap=opts["softcap"], logit_scale=opts.get("logit_scale", 1.0))
    ours = run_fused(hidden, weight, targets, b, g, g_lse, train_head=head == "trainable", grad_entropy=g_ent,
                     backend=backend, **transform)
    names = ("logp", "lse", "d_hidden") + (("d_weight", "d_bias") if head == "trainable" else ()) + STATS
    assert_close_to_reference(ours, truth, naive, dtype, names=names)
    assert_top1_matches(ours, truth, hidden, weight, b, **transform)
    if head == "frozen":
        assert ours.d_weight is None and ours.d_bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_vocab_half_precision(backend, dtype):
    (hidden, weight, targets, b, g, _, _), truth, naive = references(100, 32003, 64, dtype, True, 1.0, None, False)
    ours = run_fused(hidden, weight, targets, b, g, backend=backend)
    assert_close_to_reference(ours, truth, naive, dtype)


def test_backends_agree():
    names = [b for b in lk.available_backends() if b != "auto"]
    if len(names) < 2:
        pytest.skip("needs two backends")
    hidden, weight, targets, b, g = make_inputs(300, 5000, 32, seed=3)
    results = {name: run_fused(hidden, weight, targets, b, g, backend=name, softcap=8.0, temperature=0.9)
               for name in names}
    for other in names[1:]:  # torch vs cpp vs triton (interpreted here), on the same inputs
        for name, a in results[names[0]].tensors().items():
            torch.testing.assert_close(results[other].tensors()[name], a, rtol=1e-5, atol=1e-5,
                                       msg=f"{other} vs {names[0]}: {name}")


def test_chunk_size_does_not_change_result(backend):
    hidden, weight, targets, b, g = make_inputs(130, 777, 16, seed=4)
    whole = run_fused(hidden, weight, targets, b, g, backend=backend, chunk_size=1000)
    for chunk in (1, 7, 64):
        part = run_fused(hidden, weight, targets, b, g, backend=backend, chunk_size=chunk)
        for name, value in part.tensors().items():
            torch.testing.assert_close(value, whole.tensors()[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("pattern", ["none_ignored", "all_ignored", "first_last", "alternate", "custom_index"])
def test_ignore_patterns(backend, pattern, head):
    hidden, weight, targets, b, g = make_inputs(64, 300, 16, ignore_frac=0.0, seed=5)
    ignore_index = -100
    if pattern == "all_ignored":
        targets[:] = -100
    elif pattern == "first_last":
        targets[[0, -1]] = -100
    elif pattern == "alternate":
        targets[::2] = -100
    elif pattern == "custom_index":
        ignore_index = 7
        targets[::3] = 7
    kw = dict(grad_logp=g, ignore_index=ignore_index)
    truth = materialized(hidden, weight, targets, b, dtype=torch.float64, **kw)
    naive = materialized(hidden, weight, targets, b, dtype=None, **kw)
    ours = run_fused(hidden, weight, targets, b, g, train_head=head == "trainable", backend=backend,
                     ignore_index=ignore_index)
    ignored = targets == ignore_index
    assert (ours.logp[ignored] == 0).all() and (ours.lse[ignored] == 0).all()
    assert (ours.d_hidden[ignored] == 0).all()
    names = ("logp", "lse", "d_hidden") + (("d_weight", "d_bias") if head == "trainable" else ())
    assert_close_to_reference(ours, truth, naive, torch.float32, names=names)


def test_empty_input_gives_empty_output_and_zero_grads(backend):
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    logp = lk.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias, backend=backend)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_all_ignored_gives_zeros_not_nan(backend):
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((2, 5), -100)
    logp = lk.linear_logprobs(hidden, weight, targets, backend=backend)
    (logp * 3.0).sum().backward()
    assert torch.equal(logp, torch.zeros(2, 5))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_logits(backend, scale):
    hidden, weight, targets, b, g = make_inputs(50, 4000, 16, logit_scale=scale, seed=6)
    for softcap in (None, 30.0):
        kw = dict(grad_logp=g, softcap=softcap)
        truth = materialized(hidden, weight, targets, b, dtype=torch.float64, **kw)
        naive = materialized(hidden, weight, targets, b, dtype=None, **kw)
        ours = run_fused(hidden, weight, targets, b, g, backend=backend, softcap=softcap)
        assert_close_to_reference(ours, truth, naive, torch.float32)


def test_masking_bias_with_minus_inf(backend):
    """A bias of -inf removes tokens from the softmax; whole -inf vocabulary tiles must not give NaN."""
    hidden, weight, targets, _, g = make_inputs(40, 3000, 8, ignore_frac=0.0, seed=7)
    bias = torch.zeros(3000)
    bias[1000:] = float("-inf")
    targets = targets % 1000
    kw = dict(grad_logp=g)
    truth = materialized(hidden, weight, targets, bias, dtype=torch.float64, **kw)
    ours = run_fused(hidden, weight, targets, bias, g, backend=backend)
    torch.testing.assert_close(ours.logp.double(), truth.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.d_hidden.double(), truth.d_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.d_weight.double(), truth.d_weight, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs(backend):
    hidden, weight, targets, b, g = make_inputs(90, 500, 24, seed=8)
    base = run_fused(hidden, weight, targets, b, g, backend=backend)
    # The same values behind strided views.
    hidden_nc = torch.empty(24, 90 * 2)[:, ::2].T
    hidden_nc.copy_(hidden)
    weight_nc = torch.empty(500, 48)[:, ::2]
    weight_nc.copy_(weight)
    targets_nc = torch.empty(180, dtype=torch.long)[::2]
    targets_nc.copy_(targets)
    bias_nc = torch.empty(1000)[::2]
    bias_nc.copy_(b)
    assert not (hidden_nc.is_contiguous() or weight_nc.is_contiguous() or targets_nc.is_contiguous())
    strided = run_fused(hidden_nc, weight_nc, targets_nc, bias_nc, g, backend=backend)
    for name, value in strided.tensors().items():
        torch.testing.assert_close(value, base.tensors()[name], rtol=1e-6, atol=1e-6, msg=name)


def test_leading_dims_and_int32_targets(backend):
    hidden, weight, targets, b, g = make_inputs(24, 100, 8, seed=9)
    flat = run_fused(hidden, weight, targets, b, g, backend=backend)
    logp = lk.linear_logprobs(hidden.view(2, 3, 4, 8), weight, targets.view(2, 3, 4).int(), b, backend=backend)
    assert logp.shape == (2, 3, 4)
    torch.testing.assert_close(logp.reshape(-1), flat.logp)
    single = lk.linear_logprobs(hidden[1], weight, targets[1].clamp_min(0), b, backend=backend)
    assert single.shape == ()


def test_frozen_head_backward_needs_no_backend_backward(backend, monkeypatch):
    """With weight and bias frozen the backward is elementwise from the forward's gradient basis."""
    from logo_kernels.backends import resolve_backend
    impl = resolve_backend(backend, torch.device("cpu"), torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the frozen-head backward must not recompute logits")

    monkeypatch.setattr(type(impl), "backward", refuse)
    hidden, weight, targets, b, g = make_inputs(50, 300, 16, seed=14)
    truth = materialized(hidden, weight, targets, b, grad_logp=g, softcap=5.0)
    ours = run_fused(hidden, weight, targets, b, g, train_head=False, backend=backend, softcap=5.0)
    torch.testing.assert_close(ours.d_hidden.double(), truth.d_hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpp" not in lk.available_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("softcap", [0.0, 7.0])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_superblocks_match_single_pass(softcap, filtered, dtype):
    """A tiny workspace forces token superblocks in the forward (basis, statistics, tile maxima of filtering) and the
    backward (dH partials, the filtered walk: gathered and dense rows). bf16: the bf16 products where the CPU has
    them (tests/test_bf16_dot.py), and a head gradient accumulated in fp32 over the superblocks against one written
    per tile."""
    hidden, weight, targets, bias, g = make_inputs(300, 5000, 32, dtype=dtype, ignore_frac=0.0, seed=15)
    grad_lse, grad_entropy = torch.randn(300), torch.randn(300)
    fwd, bwd = torch.ops.logo_kernels.linear_logprobs_fwd, torch.ops.logo_kernels.linear_logprobs_bwd
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(3)) if filtered else None
    results = []
    for workspace in (1 << 30, 1):  # one superblock; superblocks of one 16-token block
        outputs = fwd(hidden, weight, bias, targets, 1.7, 0.8, softcap, 16, 512, not filtered, True, True, True,
                      True, workspace, filtered, 128, math.log(2**-10), 16 * 2**-10, order)
        live = outputs[7] if filtered else None
        grads = bwd(g, grad_lse, grad_entropy, hidden, weight, bias, targets, outputs[1], outputs[3], 1.7, 0.8,
                    softcap, 16, 256 if filtered else 512, True, True, True, workspace, live, 128, order)
        results.append(tuple(outputs) + tuple(grads))
    if filtered:
        assert 0 < results[0][7].float().mean() < 1, "nothing (or everything) skipped: the test tests nothing"
    names = ["logp", "lse", "basis", "entropy", "log_sum_sq", "mean", "top1", "live", "d_h", "d_w", "d_b"]
    for name, a, b in zip(names, *results):
        # gradients in bf16: other fp32 summation orders may round to the neighbouring bf16 value (one ulp, 2^-8)
        rtol = 2.0**-7 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5, msg=name)


def test_frozen_weight_and_hidden_only_grads(backend):
    hidden, weight, targets, b, g = make_inputs(60, 700, 16, seed=10)
    truth = materialized(hidden, weight, targets, b, grad_logp=g)
    h = hidden.clone().requires_grad_()
    logp = lk.linear_logprobs(h, weight, targets, b, backend=backend)  # weight, bias frozen (LoRA)
    (logp * g).sum().backward()
    torch.testing.assert_close(h.grad.double(), truth.d_hidden, rtol=1e-5, atol=1e-5)
    w = weight.clone().requires_grad_()
    logp = lk.linear_logprobs(hidden, w, targets, b, backend=backend)  # only the head trains
    (logp * g).sum().backward()
    torch.testing.assert_close(w.grad.double(), truth.d_weight, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_torch_backend():
    hidden, weight, targets, b, _ = make_inputs(6, 9, 4, seed=11)
    args = [t.double().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bias):
        logp, lse = lk.linear_logprobs(h, w, targets, bias, backend="torch", temperature=0.8, softcap=3.0,
                                       return_lse=True, chunk_size=4)
        return logp, lse

    assert torch.autograd.gradcheck(fn, args)


def test_torch_compile_sees_the_op(backend):
    hidden, weight, targets, b, g = make_inputs(32, 200, 16, seed=12)
    eager = lk.linear_logprobs(hidden, weight, targets, b, backend=backend)
    compiled = torch.compile(lambda h, w, t, bias: lk.linear_logprobs(h, w, t, bias, backend=backend),
                             backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, weight, targets, b), eager)


def _fallback_run(setup: str) -> str:
    """Runs ``setup`` (which makes the C++ extension unavailable) in a fresh process, then two calls of the op on
    ``auto``; checks the result against log_softmax and returns "<number of warnings> <first warning>"."""
    import subprocess
    import sys
    script = (
        "import sys, warnings, torch\n" + setup +
        "import logo_kernels as lk\n"
        "assert 'cpp' not in lk.available_backends(), lk.available_backends()\n"
        "h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = lk.linear_logprobs(h, w, t); lk.linear_logprobs(h, w, t)\n"
        "assert torch.allclose(a, torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0], atol=1e-5)\n"
        "print(len(caught), caught[0].message)\n"
    )
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout


def test_without_the_extension_auto_falls_back_to_torch_with_one_warning():
    out = _fallback_run("sys.modules['logo_kernels._C'] = None  # as if it had not been built\n")
    assert out.startswith("1 ") and "C++ extension not available, using the slower torch backend" in out


def test_an_extension_built_for_another_torch_is_not_loaded_and_auto_falls_back_with_one_warning():
    out = _fallback_run(
        "from logo_kernels.backends import cpp\n"
        "cpp._LOAD_ERROR = cpp.load_extension(running=torch.__version__, built='2.0.0+cu118')  # the import-time "
        "load's answer when the versions differ\n")
    assert out.startswith("1 ") and "C++ extension not available, using the slower torch backend" in out
    assert f"built for torch 2.0.0+cu118 but torch {torch.__version__} is running" in out
    assert "pip install --no-build-isolation --no-deps --force-reinstall logo-kernels" in out
    from logo_kernels.backends import cpp
    assert cpp.load_extension(running="2.13.1", built="2.13.1+cpu") is None  # the same release (another build)


def test_cpp_extension_is_built():
    """CI builds the extension; the fallback is only allowed when it was skipped on purpose."""
    if os.environ.get("LOGO_KERNELS_NO_EXT") == "1":
        pytest.skip("extension disabled on purpose")
    assert "cpp" in lk.available_backends(), "C++ extension failed to build or load"


@functools.lru_cache(maxsize=1)
def _huge_case():
    """N * V > 2**31 inputs and their fp64 reference. The rows share one of K = 64 hidden vectors, in contiguous
    blocks of ~1K rows, so that the reference needs K x V logits, not N x V (an [N, V] fp64 tensor would take 17 GB,
    and computing it block by block took most of this test's time); an offset that wraps — what this case is about —
    lands in another block, whose hidden vector differs. Targets and upstream gradients are per row; the last rows
    hit the last columns (the largest offsets). The gradient formula itself is checked against autograd by the
    small-shape tests; here it is applied directly: dlogits_i = g_i (onehot(t_i) - p_k(i))."""
    n, vocab, dim, groups = 65_600, 32_768, 1, 64
    g = torch.Generator().manual_seed(13)
    group = torch.arange(n) * groups // n
    distinct = torch.randn(groups, dim, generator=g)
    hidden = distinct[group].contiguous()
    weight = torch.randn(vocab, dim, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[-8:] = torch.arange(vocab - 8, vocab)
    grad_logp = torch.randn(n, generator=g)
    h64, w64, g64 = distinct.double(), weight.double(), grad_logp.double()
    logits = h64 @ w64.T  # [K, V]
    lse = torch.logsumexp(logits, dim=1)
    probs = torch.exp(logits - lse[:, None])
    logp = logits[group, targets] - lse[group]
    d_hidden = g64[:, None] * (w64[targets] - (probs @ w64)[group])
    d_weight = torch.zeros(vocab, dim, dtype=torch.float64).index_add_(0, targets, g64[:, None] * h64[group])
    d_weight -= probs.T @ (torch.zeros(groups, dtype=torch.float64).index_add_(0, group, g64)[:, None] * h64)
    return (hidden, weight, targets, grad_logp), (logp, d_hidden, d_weight)


def test_more_than_2_pow_31_logits(backend):
    """N * V > 2**31 with a tiny D: offsets must be 64-bit everywhere."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("~9 minutes under the Triton interpreter: test_more_than_2_pow_31_logits_triton_interpreted (slow)")
    if backend == "torch":
        pytest.skip("~40 s of fp32 passes over 2^31 logits: test_more_than_2_pow_31_logits_torch_backend (slow, CI)")
    check_huge_case(backend)


@pytest.mark.slow
def test_more_than_2_pow_31_logits_torch_backend():
    check_huge_case("torch")


@pytest.mark.slow
def test_more_than_2_pow_31_logits_triton_interpreted():
    if "triton" not in lk.available_backends():
        pytest.skip("triton not available")
    check_huge_case("triton")


def check_huge_case(backend):
    """Against fp64 within the tolerance rule's accumulation term (the naive fp32 computation would need the
    17 GB logits): (4 sqrt(K) eps_fp32 + 2 eps_fp32) (1 + max|truth|), K = V for logp and dHidden, N for dWeight.
    A wrapped offset reads another row or column: errors of order one."""
    (hidden, weight, targets, grad_logp), (logp, d_hidden, d_weight) = _huge_case()
    n, vocab = targets.numel(), weight.shape[0]
    assert n * vocab > 2**31
    ours = run_fused(hidden, weight, targets, None, grad_logp, backend=backend)
    eps = torch.finfo(torch.float32).eps
    for name, value, truth, k in (("logp", ours.logp, logp, vocab), ("d_hidden", ours.d_hidden, d_hidden, vocab),
                                  ("d_weight", ours.d_weight, d_weight, n)):
        tol = (4 * k ** 0.5 * eps + 2 * eps) * (1 + truth.abs().max().item())
        torch.testing.assert_close(value.double(), truth, rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("hidden_dtype, weight_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                        (torch.float16, torch.bfloat16)])
def test_mixed_hidden_and_head_dtypes_compute_in_fp32(backend, hidden_dtype, weight_dtype):
    """TRL's cast_lm_head_to_fp32 passes fp32 hidden states with a bf16 head (and the reverse happens): the tiles
    multiply in fp32 — as exact as the fp64 reference of the rounded inputs allows — and each gradient comes back
    in its input's dtype, without a full-precision copy of the head."""
    hidden, weight, targets, b, g = make_inputs(120, 900, 32, seed=21)
    hidden, weight, b = hidden.to(hidden_dtype), weight.to(weight_dtype), b.to(weight_dtype)
    truth = materialized(hidden.double(), weight.double(), targets, b.double(), grad_logp=g, softcap=9.0)
    naive = materialized(hidden.float(), weight.float(), targets, b.float(), grad_logp=g, softcap=9.0, dtype=None)
    ours = run_fused(hidden, weight, targets, b, g, backend=backend, softcap=9.0)
    assert ours.d_hidden.dtype == hidden_dtype and ours.d_weight.dtype == weight_dtype
    assert_close_to_reference(ours, truth, naive, torch.bfloat16, names=("logp", "lse", "d_hidden", "d_weight",
                                                                         "d_bias") + STATS)


def test_autocast_around_the_op_changes_nothing(backend):
    hidden, weight, targets, b, g = make_inputs(64, 500, 16, seed=22)
    plain = run_fused(hidden, weight, targets, b, g, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run_fused(hidden, weight, targets, b, g, backend=backend)
    for name, value in cast.tensors().items():
        torch.testing.assert_close(value, plain.tensors()[name], rtol=0, atol=0, msg=name)

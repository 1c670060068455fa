"""Property-based tests of linear_logprobs (hypothesis): whatever the inputs, every backend returns the float64
reference's numbers (within the naive same-dtype error + tol) or raises a clear error — never a wrong number.

Drawn: target dtypes (int8 .. int64, uint8) and values across each dtype's whole range (so out-of-range and
wrapped ids occur), ignore_index inside and outside the vocabulary and outside the target dtype's range, shapes
down to N = 0 and V = 1, ignore patterns, logit magnitudes up to 1e4, bias (with -inf masks), temperature,
softcap, logit_scale, output subsets, and non-finite values planted in every tensor. The default run keeps
~1 minute (profile "default"); ``make test-slow`` runs the "thorough" profile.
"""
import math
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import logo_kernels as lk  # noqa: E402
from conftest import CPU_BACKENDS  # noqa: E402
from reference import Result, assert_close_to_reference, materialized, top1_margin  # noqa: E402

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TARGET_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUTPUTS = ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@st.composite
def cases(draw):
    target_dtype = draw(st.sampled_from(TARGET_DTYPES))
    info = torch.iinfo(target_dtype)
    n = draw(st.integers(0, 24))
    vocab = draw(st.sampled_from([1, 2, 3, 17, 100, 130, 257, 300]))
    dim = draw(st.integers(1, 12))
    # ignore_index: the usual -100, a real class, or a value the target dtype cannot hold
    ignore_index = draw(st.sampled_from([-100, 0, vocab - 1, 200, 40000, -1]))
    valid_ids = st.integers(0, min(vocab - 1, info.max))
    wild_ids = st.integers(info.min, info.max)
    ignorable = st.just(ignore_index) if info.min <= ignore_index <= info.max else valid_ids
    values = draw(st.lists(st.one_of(valid_ids, valid_ids, valid_ids, ignorable), min_size=n, max_size=n))
    if n and draw(st.booleans()):  # one id anywhere in the dtype's range: out of [0, V) or wrapped, often
        values[draw(st.integers(0, n - 1))] = draw(wild_ids)
    options = dict(
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        log_scale=draw(st.floats(-1.0, 4.0)),
        bias=draw(st.sampled_from(["none", "finite", "masked"])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        softcap=draw(st.sampled_from([None, None, 5.0, 30.0])),
        logit_scale=draw(st.sampled_from([1.0, 1.0, 0.3, 4.0])),
        outputs=draw(st.sampled_from([None, ("logp",), ("logp", "entropy"), OUTPUTS])),
        seed=draw(st.integers(0, 2**16)),
    )
    return target_dtype, n, vocab, dim, ignore_index, values, options


def _inputs(n, vocab, dim, options):
    g = torch.Generator().manual_seed(options["seed"])
    scale = 10 ** options["log_scale"] / math.sqrt(dim)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * scale
    bias = None
    if options["bias"] != "none":
        bias = torch.randn(vocab, generator=g)
        if options["bias"] == "masked" and vocab > 1:
            bias[torch.rand(vocab, generator=g) < 0.3] = float("-inf")
            bias[0] = 0.0  # never every token
    cast = lambda t: None if t is None else t.to(options["dtype"])  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def check_case(backend, case):
    target_dtype, n, vocab, dim, ignore_index, values, options = case
    targets = torch.tensor(values, dtype=torch.int64).to(target_dtype)
    exact = torch.tensor(values, dtype=torch.int64)  # the ids as the user meant them (no wrap-around)
    hidden, weight, bias = _inputs(n, vocab, dim, options)
    transform = dict(temperature=options["temperature"], softcap=options["softcap"],
                     logit_scale=options["logit_scale"])
    kwargs = dict(ignore_index=ignore_index, backend=backend, **transform)
    outputs = options["outputs"]
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    bad = (exact != ignore_index) & ((exact < 0) | (exact >= vocab))
    if bool(bad.any()):
        hypothesis.event("refused: target out of range")
        first = int(bad.nonzero()[0, 0])
        with pytest.raises(ValueError, match=rf"targets\[{first}\] = {values[first]} is outside \[0, V={vocab}\)"):
            lk.linear_logprobs(h, w, targets, bias, outputs=outputs, **kwargs)
        return

    scored = exact != ignore_index
    if bias is not None and bool(scored.any()):
        masked_target = torch.isinf(bias.float()[exact.clamp(0, vocab - 1)]) & scored
        if bool(masked_target.any()):  # probability 0: logp -inf (as the materialised computation): not drawn here
            exact = torch.where(masked_target, torch.zeros_like(exact), exact)  # bias[0] is never masked
            targets = exact.to(target_dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(options["seed"] + 1))
    truth = materialized(hidden, weight, exact, bias, grad_logp=g, ignore_index=ignore_index, dtype=torch.float64,
                         **transform)
    if not torch.isfinite(truth.lse).all():
        hypothesis.event("refused: logits overflow")
        with pytest.raises(FloatingPointError, match="overflow float32"):
            lk.linear_logprobs(h, w, targets, bias, outputs=outputs, **kwargs)
        return
    naive = materialized(hidden, weight, exact, bias, grad_logp=g, ignore_index=ignore_index, dtype=None, **transform)
    try:
        result = lk.linear_logprobs(h, w, targets, bias, outputs=outputs, **kwargs)
    except FloatingPointError:  # fp32 overflows where fp64 does not: refused, never a NaN
        hypothesis.event("refused: fp32 overflow")
        assert not torch.isfinite(naive.lse).all() or not torch.isfinite(naive.logp).all()
        return
    hypothesis.event(f"compared: {'some' if bool(scored.any()) else 'no'} scored tokens")
    logp = result if outputs is None else result.logp
    (logp * g).sum().backward()
    ours_stats = {} if outputs is None else {k: getattr(result, k).detach() for k in OUTPUTS[2:] if k in outputs}
    ours = Result(logp.detach(), truth.lse if outputs is None or "lse" not in outputs else result.lse.detach(),
                  h.grad, w.grad, None, ours_stats)
    names = ("logp", "d_hidden", "d_weight") + tuple(k for k in ("lse", "entropy", "log_sum_sq_probs",
                                                                 "mean_logits") if outputs and k in outputs)
    if options["bias"] == "masked":
        names = tuple(k for k in names if k != "mean_logits")  # -inf where a token is masked, in both
    names = tuple(k for k in names if not _beyond_the_dtype(k, ours, truth, naive, options["dtype"]))
    assert_close_to_reference(ours, truth, naive, options["dtype"], names=names)
    assert torch.equal(ours.logp[~scored], torch.zeros_like(ours.logp[~scored]))
    if outputs and "is_top1" in outputs and n:
        margin = top1_margin(hidden, weight, bias, **transform)
        clear = (margin > 1e-2 * (1 + truth.lse.abs())) & scored
        assert torch.equal(result.is_top1[clear], truth.stats["is_top1"][clear])


def _beyond_the_dtype(name, ours, truth, naive, dtype) -> bool:
    """A gradient whose exact value lies outside the half-precision range (large logits, fp16) cannot come back finite:
    it must be inf of the right sign where the truth is clearly beyond the largest finite value, and within the
    tolerance rule where it is clearly inside. True (and checked) when that is the case: the whole-tensor comparison
    then skips it (the naive same-dtype error is NaN there)."""
    if name not in ("d_hidden", "d_weight") or dtype == torch.float32:
        return False
    exact, value = getattr(truth, name), getattr(ours, name)
    largest = torch.finfo(dtype).max
    if exact is None or value is None or not bool((exact.abs() > largest).any()):
        return False
    hypothesis.event(f"{name} beyond {dtype}")
    beyond, inside = exact.abs() > 1.01 * largest, exact.abs() < 0.99 * largest
    assert torch.equal(value[beyond].double(), exact[beyond].sign() * math.inf), f"{name}: not inf beyond {dtype}"
    assert torch.isfinite(value[inside]).all(), f"{name}: non-finite where the exact value fits {dtype}"
    if bool(inside.any()):
        # the length of the sum behind each element (V for d_hidden: unknown here with a frozen head, taken large)
        vocab = truth.d_weight.shape[0] if truth.d_weight is not None else 1 << 20
        reduction = vocab if name == "d_hidden" else max(truth.logp.numel(), 1)
        err = (value[inside].double() - exact[inside]).abs().max().item()
        naive_err = (getattr(naive, name)[inside].double() - exact[inside]).abs().max().item()
        tol = (4 * reduction**0.5 * torch.finfo(torch.float32).eps + 2 * torch.finfo(dtype).eps) * (
            1 + exact[inside].abs().max().item())
        assert err <= (naive_err if math.isfinite(naive_err) else 0.0) + tol, f"{name}: error {err:.3e} inside {dtype}"
    return True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(settings.get_profile("default"))
@given(case=cases())
def test_any_input_gives_the_reference_or_a_clear_error(backend, case):
    check_case(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(settings.get_profile("thorough"))
@given(case=cases())
def test_any_input_gives_the_reference_or_a_clear_error_thorough(backend, case):
    check_case(backend, case)


@st.composite
def poisoned(draw):
    where = draw(st.sampled_from(["hidden", "weight", "bias"]))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n, vocab, dim = draw(st.integers(1, 8)), draw(st.integers(2, 50)), draw(st.integers(1, 6))
    index = draw(st.integers(0, 10**6))
    return where, value, dtype, n, vocab, dim, index


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(settings.get_profile("default"))
@given(case=poisoned())
def test_non_finite_inputs_are_refused_or_exact(backend, case):
    """NaN / ±inf anywhere in hidden or weight, NaN / +inf in the bias: ValueError naming the tensor and the
    element. -inf in the bias masks a token: the result equals the reference."""
    where, value, dtype, n, vocab, dim, index = case
    tensors = {"hidden": torch.randn(n, dim), "weight": torch.randn(vocab, dim), "bias": torch.randn(vocab)}
    flat = tensors[where].view(-1)
    position = index % flat.numel()
    flat[position] = value
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(index))
    if where == "bias" and value == float("-inf"):
        targets = torch.where(targets == position, (targets + 1) % vocab, targets)
        truth = materialized(tensors["hidden"], tensors["weight"], targets, tensors["bias"],
                             grad_logp=torch.ones(n))
        got = lk.linear_logprobs(tensors["hidden"], tensors["weight"], targets, tensors["bias"], backend=backend)
        torch.testing.assert_close(got.double(), truth.logp, rtol=2e-2, atol=2e-2)
        return
    coords = torch.unravel_index(torch.tensor(position), tuple(tensors[where].shape))
    shown = "[" + ", ".join(str(int(c)) for c in coords) + "]"
    with pytest.raises(ValueError, match=re.escape(f"{where}{shown} = ")):
        lk.linear_logprobs(tensors["hidden"], tensors["weight"], targets, tensors["bias"], backend=backend)

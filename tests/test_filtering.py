"""Gradient filtering (``filter_eps``): every backend implements the documented rule exactly, the filtered gradients
stay within the documented bound of the exact ones (every dtype), ``"auto"`` keeps half-precision gradients within
the project's tolerance rule, bad values are refused, and LOGO training with filtering follows the exact run.

The rule (docs/filtering.md): the vocabulary, walked in mean-logit order, is cut into blocks; a (token, block) pair
whose probabilities all lie below eps and that does not hold the token's target contributes nothing to the
backward. The C++ and torch backends decide per (token, block of FILTER_BLOCK ids), the Triton kernels per tile
(tokens x BLOCK_V) — here small tiles under the interpreter so that tiles are skipped at all.
"""
import math
import os
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import logo_kernels as lk  # noqa: E402
from conftest import CPU_BACKENDS  # noqa: E402
from logo_kernels._validation import MAX_FILTER_EPS, auto_filter_eps  # noqa: E402
from logo_kernels.backends import FILTER_BLOCK, FILTER_MASS_FACTOR, Filter, mean_logit_order  # noqa: E402
from reference import assert_close_to_reference, materialized, transformed_logits  # noqa: E402
from test_linear_logprobs import run_fused  # noqa: E402

GRAD_OUTPUTS = ("logp", "lse", "entropy")  # the differentiable outputs: the objective's

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import lm_like  # noqa: E402

PROFILE = settings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
TRITON_MAX_BLOCK_V = 32
TRITON_BLOCK_N = 16  # the chunk_size the Triton cases pass (caps BLOCK_N)


@pytest.fixture
def small_triton_tiles(monkeypatch):
    """Small interpreter tiles, so that Triton tiles can be skipped on test-sized shapes."""
    import logo_kernels.triton_kernels.configs as configs

    monkeypatch.setattr(configs, "INTERPRETER_MAX_BLOCK_V", TRITON_MAX_BLOCK_V)


def granularity(backend: str, vocab: int):
    """(vocabulary block, token block, extra op kwargs) of ``backend``'s filtering decision."""
    if backend == "cpp":  # a small token block: several gathers and dense runs per tile
        return FILTER_BLOCK, 1, {"chunk_size": 8}
    if backend != "triton":
        return FILTER_BLOCK, 1, {}
    from logo_kernels.triton_kernels.configs import _pow2

    return _pow2(vocab, 16, TRITON_MAX_BLOCK_V), TRITON_BLOCK_N, {"chunk_size": TRITON_BLOCK_N}


def upstream(n, seed, with_lse, with_entropy):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g), torch.randn(n, generator=g) if with_lse else None,
            torch.randn(n, generator=g) if with_entropy else None)


def exact_logit_grads(hidden, weight, bias, targets, grads, transform, ignore_index=-100):
    """fp64 on the kept tokens: (h, w, b leaves, transformed logits x, dL/dx, log p, kept row indices)."""
    g, g_lse, g_ent = grads
    kept = (targets != ignore_index).nonzero().squeeze(1)
    h = hidden.index_select(0, kept).double().requires_grad_()
    w = weight.double().requires_grad_()
    b = None if bias is None else bias.double().requires_grad_()
    x = transformed_logits(h, w, b, **transform)
    lse = torch.logsumexp(x, dim=1)
    log_p = x - lse[:, None]
    t = targets.index_select(0, kept)
    p = log_p.exp()
    objective = (log_p.gather(1, t[:, None]).squeeze(1) * g[kept].double()).sum()
    if g_lse is not None:
        objective = objective + (lse * g_lse[kept].double()).sum()
    if g_ent is not None:  # 0 log 0 = 0 with a zero gradient (masked ids: log p = -inf)
        entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(1)
        objective = objective + (entropy * g_ent[kept].double()).sum()
    (d_x,) = torch.autograd.grad(objective, x, retain_graph=True)
    return h, w, b, x, d_x, log_p.detach(), kept


def grads_of_masked(h, w, b, x, d_x, keep, n, kept):
    """(dH [n, D], dW, db) fp64 of the logits gradient d_x with only ``keep`` entries."""
    leaves = [h, w] + ([b] if b is not None else [])
    out = torch.autograd.grad(x, leaves, grad_outputs=d_x * keep, retain_graph=True)
    d_h = torch.zeros(n, h.shape[1], dtype=torch.float64).index_copy_(0, kept, out[0])
    return d_h, out[1], out[2] if b is not None else None


@st.composite
def filter_cases(draw, dtypes=(torch.float32,)):
    n = draw(st.integers(1, 40))
    vocab = draw(st.sampled_from([17, 100, 300, 1000]))
    dim = draw(st.integers(1, 16))
    return dict(
        n=n, vocab=vocab, dim=dim, dtype=draw(st.sampled_from(dtypes)),
        log_scale=draw(st.floats(0.0, 1.3)),  # logits up to ~20 wide: peaky rows with much below eps
        bias=draw(st.sampled_from(["none", "finite", "masked"])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        softcap=draw(st.sampled_from([None, None, 15.0])),
        logit_scale=draw(st.sampled_from([1.0, 2.0])),
        with_lse=draw(st.booleans()), with_entropy=draw(st.booleans()),
        ignore=draw(st.sampled_from([0.0, 0.3])),
        eps=draw(st.sampled_from([2.0**-7, 2.0**-10, 2.0**-12, "auto"])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_case(case):
    g = torch.Generator().manual_seed(case["seed"])
    n, vocab, dim = case["n"], case["vocab"], case["dim"]
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (10 ** case["log_scale"] / math.sqrt(dim))
    bias = None
    if case["bias"] != "none":
        bias = torch.randn(vocab, generator=g)
        if case["bias"] == "masked":
            bias[torch.rand(vocab, generator=g) < 0.3] = float("-inf")
            bias[0] = 0.0
    targets = torch.randint(0, vocab, (n,), generator=g)
    if bias is not None:
        targets[torch.isinf(bias[targets])] = 0
    targets[torch.rand(n, generator=g) < case["ignore"]] = -100
    cast = lambda x: None if x is None else x.to(case["dtype"])  # noqa: E731
    transform = dict(temperature=case["temperature"], softcap=case["softcap"], logit_scale=case["logit_scale"])
    grads = upstream(n, case["seed"] + 1, case["with_lse"], case["with_entropy"])
    return cast(hidden), cast(weight), cast(bias), targets, transform, grads


def resolved_eps(case) -> float:
    return auto_filter_eps(case["dtype"]) if case["eps"] == "auto" else case["eps"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@PROFILE
@given(case=filter_cases())
def test_each_backend_skips_exactly_what_the_rule_says(backend, case, small_triton_tiles):
    """fp32: the filtered gradients equal the fp64 gradients of the logits masked by the rule (the same decision
    granularity and vocabulary order), to fp32 accuracy."""
    hidden, weight, bias, targets, transform, grads = make_case(case)
    eps = resolved_eps(case)
    assume(bool((targets != -100).any()))
    block, token_block, extra = granularity(backend, case["vocab"])
    h, w, b, x, d_x, log_p, kept = exact_logit_grads(hidden, weight, bias, targets, grads, transform)
    order = mean_logit_order(hidden.index_select(0, kept), weight, bias)
    rule = Filter(eps, order)
    # a pair whose largest log-prob sits at the threshold may be decided either way by fp32: not drawn
    walked = log_p.index_select(1, order)
    blocks = -(-case["vocab"] // block)
    padded = torch.nn.functional.pad(walked, (0, blocks * block - case["vocab"]), value=float("-inf"))
    per_block = padded.view(len(kept), blocks, block)
    margin = (per_block.amax(2) - math.log(eps)).abs()
    assume(bool((margin > 1e-3).all()))
    # nor a token whose skipped mass could cross the cap within fp32 rounding
    cap = FILTER_MASS_FACTOR * eps
    mass = torch.where(per_block.amax(2) < math.log(eps), torch.logsumexp(per_block, dim=2).exp(), 0.0)
    running = mass.sort(dim=1).values.cumsum(1)
    assume(bool(((running - cap).abs() > 1e-4 * cap).all()))
    keep = rule.keep(log_p, targets.index_select(0, kept), block, token_block)
    hypothesis.event(f"skipped share {1 - keep.double().mean().item():.1f}")
    truth = grads_of_masked(h, w, b, x, d_x, keep, case["n"], kept)
    ours = run_fused(hidden, weight, targets, bias, *grads[:2], grad_entropy=grads[2], backend=backend,
                     outputs=GRAD_OUTPUTS, filter_eps=case["eps"], **transform, **extra)
    for name, mine, ref in zip(("d_hidden", "d_weight", "d_bias"), (ours.d_hidden, ours.d_weight, ours.d_bias), truth):
        if ref is None:
            continue
        scale = 1.0 + ref.abs().max().item()
        err = (mine.double() - ref).abs().max().item()
        assert err <= 3e-5 * scale, f"{name}: {err:.3e} from the rule's fp64 gradient (scale {scale:.3g})"


def documented_bound(log_p, targets, grads, kept, hidden_kept, weight64, eps, chain):
    """Row-wise bounds (docs/filtering.md) on |filtered - exact| from the fp64 log-probabilities of the kept tokens.
    A skipped entry's logit gradient is |p (a + c log p)| <= p (|a| + |c| ln(1/p)) times chain (the softcap slope is
    <= 1), with a = g_lse - g - g_H H, c = -g_H; the skipped set S_t of a token holds only ids j != target with
    p_tj < eps (whatever the blocks), of total mass m_t <= cap = FILTER_MASS_FACTOR eps. Hence
    ||ΔdH_t|| <= chain min(Σ_{S_t} p (|a|+|c| ln 1/p) ||w_j||, (|a_t| cap + |c_t| cap ln(|V|/cap)) max ||w||)
    (the second by Jensen: Σ_S p ln(1/p) <= m ln(|S|/m), increasing in m below |S|/e), and
    ||ΔdW_j|| <= chain Σ_{t: j∈S_t} p_tj (|a_t| + |c_t| ln 1/p_tj) ||h_t||, |Δdb_j| <= the same without ||h_t||."""
    g, g_lse, g_ent = (None if x is None else x[kept].double() for x in grads)
    p = log_p.exp()
    a = -g if g_lse is None else g_lse - g
    c = torch.zeros_like(g)
    if g_ent is not None:
        entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(1)
        a = a - g_ent * entropy
        c = -g_ent
    below = (p < eps)
    below[torch.arange(len(kept)), targets[kept]] = False
    per_entry = chain * p * (a.abs()[:, None] + c.abs()[:, None] * torch.where(p > 0, -log_p, 0.0))
    weighted = torch.where(below, per_entry, 0.0)  # [n, V]
    cap, vocab = FILTER_MASS_FACTOR * eps, log_p.shape[1]
    capped = chain * (a.abs() * cap + c.abs() * cap * math.log(vocab / cap)) * weight64.norm(dim=1).max()
    bound_h = torch.minimum(weighted @ weight64.norm(dim=1), capped)
    bound_w = weighted.T @ hidden_kept.double().norm(dim=1)
    bound_b = weighted.sum(0)
    return bound_h, bound_w, bound_b


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@PROFILE
@given(case=filter_cases(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
def test_filtered_gradients_stay_within_the_documented_bound(backend, case, small_triton_tiles):
    """Every dtype: per row, |filtered - exact fp64| <= the documented bound + the naive same-dtype error (+ tol)."""
    hidden, weight, bias, targets, transform, grads = make_case(case)
    eps = resolved_eps(case)
    assume(bool((targets != -100).any()))
    _, _, extra = granularity(backend, case["vocab"])
    g, g_lse, g_ent = grads
    truth = materialized(hidden, weight, targets, bias, grad_logp=g, grad_lse=g_lse, grad_entropy=g_ent,
                         dtype=torch.float64, **transform)
    naive = materialized(hidden, weight, targets, bias, grad_logp=g, grad_lse=g_lse, grad_entropy=g_ent, dtype=None,
                         **transform)
    ours = run_fused(hidden, weight, targets, bias, g, g_lse, grad_entropy=g_ent, backend=backend,
                     outputs=GRAD_OUTPUTS, filter_eps=case["eps"], **transform, **extra)
    _, _, _, _, _, log_p, kept = exact_logit_grads(hidden, weight, bias, targets, grads, transform)
    chain = transform["logit_scale"] / transform["temperature"]
    bound_h, bound_w, bound_b = documented_bound(log_p, targets, grads, kept, hidden.index_select(0, kept),
                                                 weight.double(), eps, chain)
    eps32, eps_dtype = torch.finfo(torch.float32).eps, torch.finfo(case["dtype"]).eps
    for name, mine, ref, slack, bound in (("d_hidden", ours.d_hidden, truth.d_hidden, naive.d_hidden, bound_h),
                                          ("d_weight", ours.d_weight, truth.d_weight, naive.d_weight, bound_w),
                                          ("d_bias", ours.d_bias, truth.d_bias, naive.d_bias, bound_b)):
        if ref is None:
            continue
        ref_rows = ref if name != "d_hidden" else ref.index_select(0, kept)
        mine_rows = (mine if name != "d_hidden" else mine.index_select(0, kept)).double()
        naive_rows = (slack if name != "d_hidden" else slack.index_select(0, kept)).double()
        width = 1 if ref_rows.dim() == 1 else ref_rows.shape[1]
        reduction = case["vocab"] if name == "d_hidden" else case["n"]
        tol = (4 * reduction ** 0.5 * eps32 + 2 * eps_dtype) * (1 + ref.abs().max().item())
        naive_err = (naive_rows - ref_rows).abs().max().item()
        row_err = (mine_rows - ref_rows).abs() if ref_rows.dim() == 1 else (mine_rows - ref_rows).norm(dim=1)
        allowed = bound + width ** 0.5 * (naive_err + tol)
        worst = (row_err - allowed).max().item()
        assert worst <= 0, f"{name}: a row exceeds the bound + naive error by {worst:.3e} ({case['dtype']}, eps {eps})"


#: (N, V, D) of the LM-like and Gaussian cases; smaller under the Triton interpreter (its cost grows with programs).
SHAPES = {"full": (256, 4096, 64), "triton": (64, 1024, 32)}


def shape_for(backend: str):
    return SHAPES["triton" if backend == "triton" else "full"]


def lm_like_inputs(dtype, shape=SHAPES["full"]):
    n, vocab, dim = shape
    hidden, weight = lm_like.lm_like(n, vocab, dim, seed=1, params=lm_like.LmLike(doc=128, topic=100, private=8))
    targets = lm_like.sample_targets(hidden, weight, seed=2)
    return hidden.to(dtype), weight.to(dtype), targets


def gaussian_inputs(dtype, shape=SHAPES["full"]):
    n, vocab, dim = shape
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim ** 0.5
    return hidden.to(dtype), weight.to(dtype), torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inputs", ["lm_like", "gaussian"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_auto_keeps_half_precision_within_the_tolerance_rule(backend, inputs, dtype, small_triton_tiles):
    """filter_eps="auto" at bf16 / fp16: error vs fp64 <= the naive same-dtype error + tol, for logp, lse and every
    gradient (with lse and entropy gradients too), on LM-like logits (much skipped) and Gaussian ones."""
    hidden, weight, targets = (lm_like_inputs if inputs == "lm_like" else gaussian_inputs)(dtype, shape_for(backend))
    _, _, extra = granularity(backend, weight.shape[0])
    n = hidden.shape[0]
    grads = upstream(n, 9, True, True)
    g, g_lse, g_ent = grads
    truth = materialized(hidden, weight, targets, grad_logp=g, grad_lse=g_lse, grad_entropy=g_ent,
                         dtype=torch.float64)
    naive = materialized(hidden, weight, targets, grad_logp=g, grad_lse=g_lse, grad_entropy=g_ent, dtype=None)
    ours = run_fused(hidden, weight, targets, None, g, g_lse, grad_entropy=g_ent, backend=backend, filter_eps="auto",
                     outputs=GRAD_OUTPUTS, **extra)
    assert_close_to_reference(ours, truth, naive, dtype)


def test_lm_like_inputs_are_filtered_and_gaussian_ones_are_not():
    """The two distributions of the tolerance test do what they are there for: the LM-like one skips most (token,
    block) pairs at bf16's auto eps, the Gaussian one none."""
    for (make, low, high), shape in zip(((lm_like_inputs, 0.5, 1.0), (gaussian_inputs, 0.0, 0.0)) * 2,
                                        [SHAPES["full"]] * 2 + [SHAPES["triton"]] * 2):
        hidden, weight, targets = make(torch.float32, shape)
        log_p = torch.log_softmax((hidden @ weight.T).double(), dim=1)
        rule = Filter(auto_filter_eps(torch.bfloat16), mean_logit_order(hidden, weight, None))
        skipped = 1 - rule.keep(log_p, targets).double().mean().item()
        assert low <= skipped <= high, f"{make.__name__} {shape}: skipped share {skipped:.3f}"


@pytest.mark.parametrize("bad, error", [
    (0.0, ValueError), (-1e-4, ValueError), (float("nan"), ValueError), (MAX_FILTER_EPS * 2, ValueError),
    ("exact", ValueError), (True, TypeError), (torch.tensor(1e-4), TypeError)])
def test_bad_filter_eps_is_refused_naming_the_argument(bad, error):
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(error, match="filter_eps"):
        lk.linear_logprobs(hidden, weight, torch.tensor([1, 2, 3]), filter_eps=bad)


def test_auto_rule():
    assert auto_filter_eps(torch.bfloat16) == 2.0**-12
    assert auto_filter_eps(torch.float16) == 2.0**-15
    assert auto_filter_eps(torch.float32) == 2.0**-28
    assert auto_filter_eps(torch.float32, torch.bfloat16) == 2.0**-12  # the least precise operand decides


def test_forward_outputs_are_unchanged_and_a_frozen_head_ignores_the_filter(backend, small_triton_tiles):
    hidden, weight, targets = lm_like_inputs(torch.float32, shape_for(backend))
    _, _, extra = granularity(backend, weight.shape[0])
    stats = ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    exact = lk.linear_logprobs(hidden, weight, targets, backend=backend, outputs=stats, **extra)
    filtered = lk.linear_logprobs(hidden, weight, targets, backend=backend, outputs=stats, filter_eps=2.0**-10,
                                  **extra)
    for name in stats:  # the same up to the summation order (a filtered forward walks the sorted vocabulary)
        torch.testing.assert_close(getattr(filtered, name), getattr(exact, name), rtol=1e-5, atol=1e-5, msg=name)
    grads = []
    for eps in (None, 2.0**-10):  # the frozen head's backward is elementwise: nothing to skip, exact
        h = hidden.clone().requires_grad_()
        lk.linear_logprobs(h, weight, targets, backend=backend, filter_eps=eps, **extra).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_logo_training_with_filtering_follows_the_exact_run():
    """Five SGD steps of the LOGO loss (2 negatives) on a trainable projection and head, fp32, filtered at 2^-10
    vs exact: the losses agree to first order in the documented gradient bound — |ΔL_k| <= Σ_{i<k} lr ||Δg_i||
    * max ||∇L|| (+ rounding) — and step 0 agrees to rounding (the forward is exact)."""
    from logo_kernels.losses import logo_loss

    hidden0, weight0 = lm_like.lm_like(96, 2048, 32, seed=3, params=lm_like.LmLike(doc=96, topic=60, private=4))
    targets = lm_like.sample_targets(hidden0, weight0, seed=4)
    cu_seqlens = torch.tensor([0, 32, 64, 96])
    runs = {}
    for eps in (None, 2.0**-10):
        proj = torch.eye(32).requires_grad_()
        weight = weight0.clone().requires_grad_()
        losses, grads = [], []
        for _ in range(5):
            out = logo_loss(hidden0 @ proj, weight, targets, cu_seqlens, num_negatives=2, backend="cpp",
                            filter_eps=eps)
            proj.grad = weight.grad = None
            out.loss.backward()
            losses.append(out.loss.item())
            grads.append(torch.cat([proj.grad.flatten(), weight.grad.flatten()]))
            with torch.no_grad():
                proj -= 0.5 * proj.grad
                weight -= 0.5 * weight.grad
        runs[eps] = (losses, grads)
    (exact_losses, exact_grads), (filtered_losses, filtered_grads) = runs[None], runs[2.0**-10]
    assert abs(filtered_losses[0] - exact_losses[0]) <= 1e-6 * (1 + abs(exact_losses[0]))  # summation order only
    grad_norm = max(g.norm().item() for g in exact_grads)
    drift = 0.0
    for k in range(1, 5):
        drift += 0.5 * (filtered_grads[k - 1] - exact_grads[k - 1]).norm().item()
        assert abs(filtered_losses[k] - exact_losses[k]) <= 2 * drift * grad_norm + 1e-5, k
    assert drift > 0, "nothing was skipped: the test tests nothing"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_flat_distribution_over_a_shared_mean_head_keeps_its_mass(backend, small_triton_tiles):
    """Near-uniform probabilities over a head whose rows share a large mean: every entry lies below eps, and the
    mean is most of each row. Skipping them all (the rule without its mass cap) made dH ~90x wrong; with the cap
    the skipped mass stays <= FILTER_MASS_FACTOR eps and bf16 "auto" / fp32 at 2^-12 meet the tolerance rule."""
    vocab, dim, n = (2048, 32, 16) if backend == "triton" else (16384, 64, 32)
    mean_row = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    _, _, extra = granularity(backend, vocab)
    for dtype, eps in ((torch.bfloat16, "auto"), (torch.float32, 2.0**-12)):
        weight = (0.01 * torch.randn(vocab, dim, generator=torch.Generator().manual_seed(1)) + mean_row).to(dtype)
        hidden = (0.1 * torch.randn(n, dim, generator=torch.Generator().manual_seed(2))).to(dtype)
        targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3))
        grads = upstream(n, 4, False, False)
        truth = materialized(hidden, weight, targets, grad_logp=grads[0], dtype=torch.float64)
        naive = materialized(hidden, weight, targets, grad_logp=grads[0], dtype=None)
        ours = run_fused(hidden, weight, targets, None, grads[0], backend=backend, filter_eps=eps,
                         outputs=GRAD_OUTPUTS, **extra)
        assert_close_to_reference(ours, truth, naive, dtype, names=("d_hidden", "d_weight"))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_the_raw_ops_take_no_order_as_the_identity(backend, small_triton_tiles):
    """torch.ops-level calls with filtering and order=None walk the vocabulary by id (the Triton kernels read ids
    through the order: without one they must not read the targets instead)."""
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(24, 16, generator=g) * 3, torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (24,), generator=g)
    grad = torch.randn(24, generator=g)
    results = []
    for order in (None, torch.arange(300)):
        if backend == "cpp":
            out = torch.ops.logo_kernels.linear_logprobs_fwd(hidden, weight, None, targets, 1.0, 1.0, 0.0, 8, 256, False,
                                                             False, False, False, False, 1 << 20, True, 128,
                                                             math.log(2**-10), 16 * 2**-10, order)
            grads = torch.ops.logo_kernels.linear_logprobs_bwd(grad, None, None, hidden, weight, None, targets, out[1],
                                                               None, 1.0, 1.0, 0.0, 8, 256, True, True, False, 1 << 20,
                                                               out[7], 128, order)
        else:
            from logo_kernels.backends.triton import triton_backward, triton_forward
            out = triton_forward(hidden, weight, None, targets, 1.0, 1.0, 0.0, 16, False, False, False, False, False,
                                 True, math.log(2**-10), 16 * 2**-10, order)
            grads = triton_backward(grad, None, None, hidden, weight, None, targets, out[1], None, 1.0, 1.0, 0.0, 16,
                                    True, True, False, True, out[7], order)
        results.append((out[0], out[7]) + tuple(grads[:2]))
    assert 0 < results[0][1].float().mean() < 1, "nothing (or everything) skipped: the test tests nothing"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_filtering_work_without_a_gradient(monkeypatch):
    """Under no_grad (a reference model's or old policy's log-probs) the filter computes no vocabulary order."""
    module = sys.modules["logo_kernels.linear_logprobs"]  # (the package exports the function under the same name)
    calls = []
    monkeypatch.setattr(module, "mean_logit_order", lambda *args: calls.append(1) or torch.arange(args[1].shape[0]))
    hidden, weight, targets = torch.randn(8, 4, requires_grad=True), torch.randn(300, 4), torch.randint(0, 300, (8,))
    with torch.no_grad():
        lk.linear_logprobs(hidden, weight, targets, filter_eps=2.0**-10)
    lk.linear_logprobs(hidden.detach(), weight, targets, filter_eps=2.0**-10)
    assert not calls
    lk.linear_logprobs(hidden, weight.requires_grad_(), targets, filter_eps=2.0**-10).sum().backward()
    assert calls == [1]


def test_the_training_config_takes_loss_filter_eps():
    """--loss_filter_eps / a config file's loss_filter_eps reach the LOGO loss; bad values name the field."""
    from logo.config import TrainConfig, _convert
    from logo.errors import ConfigError
    from logo.train import make_loss

    assert make_loss(TrainConfig().validate()).filter_eps is None
    for value, expected in (("auto", "auto"), (2.0**-12, 2.0**-12), ("1e-3", 1e-3)):
        config = TrainConfig(loss_filter_eps=_convert("loss_filter_eps", value)).validate()
        assert make_loss(config).filter_eps == expected
    for bad in ("0.5", "tiny", "-1e-3"):
        with pytest.raises(ConfigError, match="config field 'loss_filter_eps'"):
            TrainConfig(loss_filter_eps=bad).validate()


def test_a_token_keeping_most_of_its_blocks_keeps_them_all():
    """FILTER_KEEP_ALL_SHARE: after the rule each token keeps all of its blocks or fewer than 90 % of them — the
    rule's function (every backend's) on drawn block statistics, and the mask the C++ forward returns at a vocabulary
    of 24 blocks holding both kinds of tokens (LM-like rows and flat ones)."""
    from logo_kernels.backends import live_pairs
    from logo_kernels.backends.base import FILTER_KEEP_ALL_SHARE, KernelOptions, LogitTransform

    def check(live):
        share = live.float().mean(dim=1)
        assert bool((share == 1).any()) and bool((share < 1).any()), "the case needs both kinds of tokens"
        assert bool(((share == 1) | (share < FILTER_KEEP_ALL_SHARE)).all())

    g = torch.Generator().manual_seed(0)
    tile_max = torch.randn(200, 30, generator=g) * 6  # peaked rows: most blocks skippable
    tile_lse = tile_max + torch.rand(200, 30, generator=g) * 3
    tile_max[100:], tile_lse[100:] = -1.0, 0.0  # flat rows: every block above eps
    tile_max[150:, :2], tile_lse[150:, :2] = -40.0, -39.0  # ... but two skippable ones: kept by the share
    live = live_pairs(tile_max, tile_lse, torch.logsumexp(tile_lse, dim=1), torch.full((200,), 5), math.log(2.0**-12),
                      16 * 2.0**-12)
    check(live)
    assert bool(live[150:].all())
    if "cpp" not in lk.available_backends():
        return
    from logo_kernels.backends.cpp import CppBackend

    hidden, weight, targets = lm_like_inputs(torch.float32, (64, 24 * FILTER_BLOCK, 32))
    hidden[32:] = 0.0  # flat rows: every block holds the max probability 1 / V > eps
    stats = CppBackend().forward(hidden, weight, None, targets, LogitTransform(), KernelOptions(),
                                 filtering=Filter(2.0**-12, mean_logit_order(hidden, weight, None)))
    check(stats.live)

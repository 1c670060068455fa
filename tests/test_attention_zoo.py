"""Shared-prefix attention is exact on every model family we claim, under the family's own attention.

Reference: each ``[prefix | response]`` run alone through the model's eager attention (which honours sliding
windows, softcap and sinks), with synthesized gapped positions. Packed rows must give the same per-token
log-probs and every parameter gradient (fp32, 1e-5), with windows shorter than the prefixes and GQA.
"""
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

import logo.attention as attention
from logo.attention import enable_shared_prefix_attention
from logo.attention.exact import KeyBlock, Segment, segment_attention
from logo.data import synthesize_positions
from logo.data.packing import pack_rows
from logo.memory_trace import LiveTensorBytes
from model_zoo import VOCAB, WINDOW, ZOO, build
from packed_reference import assert_packed_equals_separate, packed_logps


def examples(seed=0, batch=2, negatives=2):
    """Prefixes longer than the window (11..20 tokens over 3 chunks at gapped positions), 2..8-token responses."""
    g = torch.Generator().manual_seed(seed)
    prefixes, responses, positions = [], [], []
    for _ in range(batch):
        chunks = [int(x) for x in torch.randint(3, 7, (3,), generator=g)]
        prefixes.append(torch.randint(3, VOCAB, (sum(chunks) + 2,), generator=g))
        positions.append(synthesize_positions(chunks, window=2048, prefix=2, tail=16, generator=g).context)
        responses.append([torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
                          for _ in range(negatives + 1)])
    assert min(p.numel() for p in prefixes) > WINDOW
    return prefixes, responses, positions


@pytest.fixture
def chunked(request):
    """Runs the test with the attention's query chunks at the given score budget, restored afterwards."""
    before = attention.settings.chunk_elements
    attention.settings.chunk_elements = request.param
    yield request.param
    attention.settings.chunk_elements = before


@pytest.mark.parametrize("chunked", [1 << 24, 40], indirect=True, ids=["one-chunk", "tiny-chunks"])
@pytest.mark.parametrize("name", list(ZOO))
def test_packed_rows_equal_separate_sequences_under_the_models_own_attention(name, chunked):
    assert_packed_equals_separate(build(name), *examples())


@pytest.mark.parametrize("name", ["mistral-sliding", "gemma2", "gemma3", "gpt-oss"])
def test_unpacked_calls_equal_eager_with_left_padding_and_a_kv_cache(name):
    """Evaluation and generation through the same attention: a left-padded batch and cached decoding."""
    model = build(name)
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    enable_shared_prefix_attention(model)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        our_gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    assert our_gen.tolist() == ref_gen.tolist()


def dense_reference(q, k, v, segments, scale, softcap, window, sinks, dtype=torch.float64):
    """Materialised attention of one row over its segments (fp64 by default)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    out = torch.zeros_like(q)
    for seg in segments:
        keys = torch.cat([torch.arange(b.start, b.stop) for b in seg.keys])
        kf = torch.cat([b.frame + torch.arange(b.stop - b.start) for b in seg.keys])
        qf = seg.frame + torch.arange(seg.stop - seg.start)
        s = q[:, seg.start:seg.stop] @ k[:, keys].transpose(1, 2) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        allowed = kf[None] <= qf[:, None]
        if window is not None:
            allowed &= kf[None] > qf[:, None] - window
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.to(dtype)[:, None, None].expand(-1, s.shape[1], 1)], -1)
        p = torch.softmax(s, -1)[..., :keys.numel()]
        out[:, seg.start:seg.stop] = p @ v[:, keys]
    return out


@hsettings(max_examples=40, deadline=None)
@given(prefix=st.integers(1, 12), responses=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]), window=st.one_of(st.none(), st.integers(1, 9)),
       softcap=st.one_of(st.none(), st.sampled_from([0.5, 2.0])), sinks=st.booleans(),
       chunk=st.sampled_from([1, 7, 1 << 20]), seed=st.integers(0, 2 ** 16))
def test_segment_attention_matches_fp64_forward_and_gradients(prefix, responses, kv_heads, groups, window, softcap,
                                                              sinks, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    heads, d = kv_heads * groups, 4
    length = prefix + sum(responses) + 2  # two padding positions
    q = (torch.randn(heads, length, d, generator=g) * 2).requires_grad_()
    k = (torch.randn(kv_heads, length, d, generator=g) * 2).requires_grad_()
    v = torch.randn(kv_heads, length, d, generator=g).requires_grad_()
    s = torch.randn(heads, generator=g).requires_grad_() if sinks else None
    segments = attention._row_segments(prefix, responses, True)
    upstream = torch.randn(heads, prefix + sum(responses), d, generator=g)
    ours = segment_attention(q, k, v, segments, scale=0.7, softcap=softcap, window=window, sinks=s, chunk_elements=chunk)
    inputs = [q, k, v] + ([s] if sinks else [])
    our_grads = torch.autograd.grad((ours * upstream).sum(), inputs)
    assert ours.shape[1] == prefix + sum(responses)  # the span of the segments: no padding rows
    ref = dense_reference(q, k, v, segments, 0.7, softcap, window, s)[:, :ours.shape[1]]
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), inputs)
    naive = dense_reference(q, k, v, segments, 0.7, softcap, window, s, torch.float32)[:, :ours.shape[1]]
    naive_grads = torch.autograd.grad((naive * upstream).sum(), inputs)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for ours_g, ref_g, naive_g in zip(our_grads, ref_grads, naive_grads):  # the tolerance rule, per gradient
        assert (ours_g.double() - ref_g).abs().max() <= (naive_g.double() - ref_g).abs().max() + 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_that_of_the_same_dtype_eager_attention(dtype):
    """Tolerance rule: error vs fp64 <= the same-dtype materialised computation's + a small tolerance."""
    g = torch.Generator().manual_seed(0)
    heads, kv, length, d = 4, 2, 40, 16
    q, k, v = (torch.randn(h, length, d, generator=g) for h in (heads, kv, kv))
    segments = attention._row_segments(24, [6, 10], True)
    args = dict(scale=d ** -0.5, softcap=3.0, window=9)
    ref = dense_reference(q, k, v, segments, sinks=None, **args)
    ours = segment_attention(q.to(dtype), k.to(dtype), v.to(dtype), segments, **args, chunk_elements=64)

    def naive(qh, kh, vh):  # eager-style: matmuls in the dtype, softmax in fp32
        out = torch.zeros_like(qh)
        kh, vh = kh.repeat_interleave(2, 0), vh.repeat_interleave(2, 0)
        for seg in segments:
            keys = torch.cat([torch.arange(b.start, b.stop) for b in seg.keys])
            kf = torch.cat([b.frame + torch.arange(b.stop - b.start) for b in seg.keys])
            qf = seg.frame + torch.arange(seg.stop - seg.start)
            s = (qh[:, seg.start:seg.stop] @ kh[:, keys].transpose(1, 2)) * args["scale"]
            s = args["softcap"] * torch.tanh(s.float() / args["softcap"])
            s = s.masked_fill(~((kf[None] <= qf[:, None]) & (kf[None] > qf[:, None] - 9)), float("-inf"))
            out[:, seg.start:seg.stop] = torch.softmax(s, -1).to(dtype) @ vh[:, keys]
        return out

    naive_error = (naive(q.to(dtype), k.to(dtype), v.to(dtype)).double() - ref).abs().max()
    assert (ours.double() - ref).abs().max() <= naive_error + 1e-3


@pytest.mark.parametrize("chunked", [1 << 17], indirect=True)
def test_attention_memory_is_the_prefix_keys_in_key_value_heads_plus_one_chunk(chunked):
    """Traced fwd + bwd of one layer's attention at a long prefix: besides its outputs and gradients, the transient
    bytes are the prefix keys and values in key/value heads (their fp32 gradient accumulators) plus a few score
    tensors of one query chunk (bounded by chunk_elements; on the flash path one backward call's three gradient
    parts) — never the query heads' count of keys, never a copy of the prefix keys per response, never [L, L]
    scores."""
    heads, kv_heads, d, prefix, response, m = 8, 2, 16, 4096, 64, 3
    length = prefix + m * response
    layouts = [pack_rows([torch.zeros(prefix, dtype=torch.long)],
                         [[torch.zeros(response, dtype=torch.long)] * m]).layouts[0]]
    q = torch.randn(1, heads, length, d, requires_grad=True)
    k = torch.randn(1, kv_heads, length, d, requires_grad=True)
    v = torch.randn(1, kv_heads, length, d, requires_grad=True)
    upstream = torch.randn(1, length, heads, d)
    kv_prefix = 2 * kv_heads * prefix * d * 4  # keys + values of the prefix, key/value heads, fp32
    # query-sized tensors: the prefix's and the row's outputs, the transposed copy transformers' layout needs, the
    # test's own product with the upstream gradient, its gradient slices and dq; dk, dv
    outputs = 6 * q.numel() * 4 + 2 * k.numel() * 4
    chunk_scores = 8 * chunked * 4  # the live [Hkv, G*C, K] fp32 tensors of a chunk (s, p, dp, ds, ...)
    flash_parts = 3 * chunked * 4  # one folded flash backward call's dQ, dK, dV parts (logo.attention.merged)
    expanded = 2 * heads * prefix * d * 4  # one copy of the prefix keys/values expanded to the query heads
    module = build("llama").model.layers[0].self_attn
    for softcap, per_chunk in ((None, flash_parts), (2.0, chunk_scores)):  # the flash prefix path, the exact path
        trace = LiveTensorBytes()
        trace.track([q, k, v, upstream])
        inputs = trace.live_bytes
        with trace:
            out, _ = attention.shared_prefix_attention(module, q, k, v, None, scaling=0.25, softcap=softcap,
                                                       shared_prefix_layouts=layouts)
            torch.autograd.grad((out * upstream).sum(), [q, k, v])
        transient = trace.peak - inputs - outputs
        assert transient <= kv_prefix + per_chunk, (softcap, transient, kv_prefix, per_chunk)
        assert transient < expanded, (softcap, transient, expanded)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_chunk_size=8), r"Llama: cannot honour the attention argument\(s\) \['attention_chunk_size'\]"),
    (dict(output_attentions=True), "output_attentions=True is not supported"),
    (dict(is_causal=False), "bidirectional"),
    (dict(s_aux=torch.zeros(3)), "s_aux has 3 logits for 4 query heads"),
    (dict(sliding_window=0), "sliding_window must be an integer >= 1"),
    (dict(softcap=float("nan")), "softcap must be a finite number > 0"),
])
def test_what_the_attention_cannot_honour_is_refused_naming_family_and_feature(kwargs, message):
    module = build("llama").model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=message):
        attention.shared_prefix_attention(module, q, k, k, None, **kwargs)


def test_dropout_in_training_is_refused():
    module = build("llama").model.layers[0].self_attn.train()
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="attention dropout 0.1 in training is not supported"):
        attention.shared_prefix_attention(module, q, k, k, None, dropout=0.1)


@pytest.mark.parametrize("layout, message", [
    ((0, (3,)), "needs a prefix and responses of at least one token each"),
    ((2, ()), "needs a prefix and responses of at least one token each"),
    ((2, (3, 0)), "needs a prefix and responses of at least one token each"),
    ((2, (3, 2)), r"is longer than the row \(6 tokens\)"),
])
def test_layouts_without_a_prefix_or_a_response_token_or_too_long_are_refused(layout, message):
    """A hand-built layout the attention cannot run is a ValueError naming the row — CPU flash with no keys or no
    queries would kill the process (SIGFPE)."""
    from logo.data.packing import RowLayout

    module = build("llama").model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="row 0: layout .*" + message):
        attention.shared_prefix_attention(module, q, k, k, None, shared_prefix_layouts=[RowLayout(*layout)])


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mistral-sliding"])
def test_flex_path_forward_equals_the_exact_path(name):
    """FlexAttention's forward runs on CPU (no backward there): the block mask and score mod give the exact
    path's log-probs; its gradients are checked by the gpu-marked test."""
    model = build(name)
    batch = pack_rows(*examples(seed=5)[:2], prefix_positions=examples(seed=5)[2])
    with torch.no_grad():
        exact = packed_logps(model, batch)
        enable_shared_prefix_attention(model, backend="flex")
        try:
            flex = packed_logps(model, batch)
        finally:
            enable_shared_prefix_attention(model, backend="exact")
    torch.testing.assert_close(flex, exact, rtol=1e-5, atol=1e-5)


def test_flex_path_refuses_to_train_on_cpu():
    model = build("gemma2")
    batch = pack_rows(*examples()[:2])
    enable_shared_prefix_attention(model, backend="flex")
    try:
        with pytest.raises(ValueError, match="FlexAttention has no backward on CPU"):
            packed_logps(model, batch)
    finally:
        enable_shared_prefix_attention(model, backend="exact")


def test_enable_refuses_unknown_backend_and_bad_chunks():
    model = build("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_shared_prefix_attention(model, backend="fast")
    with pytest.raises(ValueError, match="chunk_elements must be an integer >= 1"):
        enable_shared_prefix_attention(model, chunk_elements=0)


def test_sinks_are_sliced_to_the_ranks_heads_under_sequence_parallelism():
    module = build("gpt-oss").model.layers[0].self_attn
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    sinks = torch.randn(4)
    layouts = pack_rows([torch.zeros(3, dtype=torch.long)], [[torch.zeros(1, dtype=torch.long)] * 3]).layouts
    attention.set_head_slice(1, 2)
    try:
        out, _ = attention.shared_prefix_attention(module, q, k, v, None, scaling=0.3, s_aux=sinks,
                                                   shared_prefix_layouts=layouts)
    finally:
        attention.set_head_slice(0, 1)
    expected = segment_attention(q[0], k[0], v[0], attention._row_segments(3, (1, 1, 1), True), scale=0.3,
                                 sinks=sinks[2:])
    torch.testing.assert_close(out[0].transpose(0, 1), expected)


def test_segments_of_a_row_by_hand():
    assert attention._row_segments(3, (2, 1), True) == [
        Segment(0, 3, 0, (KeyBlock(0, 3, 0),)),
        Segment(3, 5, 3, (KeyBlock(0, 3, 0), KeyBlock(3, 5, 3))),
        Segment(5, 6, 3, (KeyBlock(0, 3, 0), KeyBlock(5, 6, 3)))]


@pytest.mark.parametrize("key_block", [4, 4096], ids=["key-blocks-of-4", "one-key-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_flash_merge_of_responses_is_exact(dtype, key_block):
    """Plain layers on CPU: each response = flash over the prefix + flash over itself, merged by log-sum-exp, and
    flash's backward per key block with the merged output (logo.attention.merged) — against fp64, forward and
    gradients, GQA; bf16 within the same-dtype materialised computation's error + a small tolerance."""
    from logo.attention.merged import responses_over_prefix

    g = torch.Generator().manual_seed(0)
    heads, kv, d, prefix, lengths = 6, 2, 16, 37, (5, 11, 3)
    length = prefix + sum(lengths)
    q, k, v = (torch.randn(1, h, length, d, generator=g).to(dtype).requires_grad_() for h in (heads, kv, kv))
    upstream = torch.randn(heads, sum(lengths), d, generator=g)
    segments = attention._row_segments(prefix, lengths, False)
    ours = responses_over_prefix(q, k, v, prefix, lengths, 0.3, key_block)[0]
    our_grads = torch.autograd.grad((ours.float() * upstream).sum(), [q, k, v])
    errors = {}
    for name, ref_dtype in (("fp64", torch.float64), ("naive", dtype)):
        ref = dense_reference(q[0], k[0], v[0], segments, 0.3, None, None, None, ref_dtype)[:, prefix:]
        grads = torch.autograd.grad((ref.double() * upstream.double()).sum(), [q, k, v])
        errors[name] = (ref, grads)
    ref, ref_grads = errors["fp64"]
    naive, naive_grads = errors["naive"]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (ours.double() - ref).abs().max() <= (naive.double() - ref).abs().max() + tol
    for mine, exact, materialised in zip(our_grads, ref_grads, naive_grads):
        assert (mine.double() - exact.double()).abs().max() <= (materialised.double() - exact.double()).abs().max() + tol


def assert_cpu_flash_row_within_the_tolerance_rule(q, k, v, prefix, lengths, scale, key_block, upstream, tol):
    """The CPU flash path of one packed row — the causal prefix, then the responses merged over it — forward and every
    gradient against a float64 materialised reference, by the tolerance rule: error <= the same-dtype materialised
    computation's + ``tol`` (for gradients ``tol`` relative to the gradient's size: flash's probabilities
    exp(s - lse) carry ~1e-6 relative error of their own, the same in one call over all keys, which the materialised
    softmax does not)."""
    from logo.attention.merged import causal_prefix, responses_over_prefix

    head = causal_prefix(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], scale, key_block)
    ours = torch.cat([head, responses_over_prefix(q, k, v, prefix, lengths, scale, key_block)], 2)[0]
    our_grads = torch.autograd.grad((ours.float() * upstream).sum(), [q, k, v])
    segments = attention._row_segments(prefix, lengths, True)
    results = {}
    for ref_dtype in (torch.float64, q.dtype):
        ref = dense_reference(q[0], k[0], v[0], segments, scale, None, None, None, ref_dtype)
        results[ref_dtype] = ref, torch.autograd.grad((ref.double() * upstream.double()).sum(), [q, k, v])
    (ref, ref_grads), (naive, naive_grads) = results[torch.float64], results[q.dtype]
    assert (ours.double() - ref).abs().max() <= (naive.double() - ref).abs().max() + tol
    for mine, exact, materialised in zip(our_grads, ref_grads, naive_grads):
        scale_of = max(1.0, float(exact.abs().max()))
        assert (mine.double() - exact).abs().max() <= (materialised.double() - exact).abs().max() + tol * scale_of


@hsettings(max_examples=30, deadline=None)
@given(prefix=st.integers(1, 40), responses=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 4]), key_block=st.integers(1, 45),
       seed=st.integers(0, 2 ** 16))
def test_cpu_flash_prefix_and_responses_match_fp64_with_folded_key_blocks(prefix, responses, kv_heads, groups,
                                                                         key_block, seed):
    """The CPU flash path of a plain layer (logo.attention.merged) with each query group folded into the batch in
    the backward and the keys walked in blocks of any size (a block's diagonal causal, the queries past it plain,
    the partial last block): forward and every gradient against float64 by the tolerance rule (fp32)."""
    g = torch.Generator().manual_seed(seed)
    heads, d = kv_heads * groups, 8
    length = prefix + sum(responses)
    q = (torch.randn(1, heads, length, d, generator=g) * 2).requires_grad_()
    k = (torch.randn(1, kv_heads, length, d, generator=g) * 2).requires_grad_()
    v = torch.randn(1, kv_heads, length, d, generator=g).requires_grad_()
    upstream = torch.randn(heads, length, d, generator=g)
    assert_cpu_flash_row_within_the_tolerance_rule(q, k, v, prefix, responses, 0.4, key_block, upstream, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_flash_path_at_production_block_sizes_in_every_dtype(dtype):
    """The CPU flash path where production runs it: a 1100-token prefix (past flash's own 512-key split) in 256-key
    backward blocks (the smallest key_block_for gives) and 256-row chunks, a response longer than a block, 4 / 1
    heads — forward and gradients against float64 by the tolerance rule, in fp32, bf16 and fp16."""
    from logo.attention.merged import key_block_for

    g = torch.Generator().manual_seed(1)
    heads, kv, d, prefix, lengths = 4, 1, 16, 1100, (300, 7)
    length = prefix + sum(lengths)
    q, k, v = (torch.randn(1, h, length, d, generator=g).to(dtype).requires_grad_() for h in (heads, kv, kv))
    key_block = key_block_for(q, 1)
    assert key_block == 256
    upstream = torch.randn(heads, length, d, generator=g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_cpu_flash_row_within_the_tolerance_rule(q, k, v, prefix, lengths, 0.25, key_block, upstream, tol)

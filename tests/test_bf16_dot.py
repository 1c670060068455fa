"""The C++ backend's bf16 tiles on CPUs with AVX512-BF16 (csrc/bf16_dot.*): bf16 operands multiplied as they are
(vdpbf16ps, fp32 sums) instead of converted to fp32 — against float64 (the tolerance rule), against the fp32-tile path
(LOGO_KERNELS_BF16_DOT=0), over the shapes that break the micro-kernel: rows not a multiple of its 12, columns not a
multiple of its 32, odd D (a half-filled last pair), D past its 512-wide chunk, N = V = D = 1. Superblocks and the
filtered walk at bf16: tests/test_linear_logprobs.py::test_cpp_superblocks_match_single_pass."""
import math

import pytest
import torch

from logo_kernels.backends import cpp
from reference import assert_close_to_reference, materialized
from test_linear_logprobs import STATS, make_inputs, run_fused

pytestmark = pytest.mark.skipif(not cpp.bf16_dot_enabled(),
                                reason="needs the C++ extension on a CPU with AVX512-BF16 (and LOGO_KERNELS_BF16_DOT "
                                       "not 0)")

EVERYTHING = dict(temperature=1.3, softcap=6.0, logit_scale=2.5)
SHAPES = [(1, 1, 1), (11, 31, 3), (13, 33, 513), (37, 700, 1030), (300, 1001, 64)]


def _case(n, vocab, dim, seed=0):
    hidden, weight, targets, bias, g = make_inputs(n, vocab, dim, dtype=torch.bfloat16, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return hidden, weight, targets, bias, g, torch.randn(n, generator=gen), torch.randn(n, generator=gen)


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("n,vocab,dim", SHAPES)
def test_bf16_products_match_float64_and_the_fp32_tiles(monkeypatch, n, vocab, dim, head):
    """Every output and gradient within the tolerance rule of fp64; the forward outputs within fp32 summation order
    of the fp32-tile path (same exact products, other sums). A frozen head takes the gradient-basis path (products of
    the probabilities with W in the forward)."""
    hidden, weight, targets, bias, g, g_lse, g_ent = _case(n, vocab, dim)
    kw = dict(grad_logp=g, grad_lse=g_lse, grad_entropy=g_ent, **EVERYTHING)
    truth = materialized(hidden, weight, targets, bias, dtype=torch.float64, **kw)
    naive = materialized(hidden, weight, targets, bias, dtype=None, **kw)
    trainable = head == "trainable"
    ours = run_fused(hidden, weight, targets, bias, g, g_lse, train_head=trainable, grad_entropy=g_ent, backend="cpp",
                     **EVERYTHING)
    names = ("logp", "lse", "d_hidden") + (("d_weight", "d_bias") if trainable else ()) + STATS
    assert_close_to_reference(ours, truth, naive, torch.bfloat16, names=names)
    monkeypatch.setenv(cpp.BF16_DOT_ENV, "0")
    fp32_tiles = run_fused(hidden, weight, targets, bias, g, g_lse, train_head=trainable, grad_entropy=g_ent,
                           backend="cpp", **EVERYTHING)
    for name in ("logp", "lse"):
        a, b = getattr(ours, name), getattr(fp32_tiles, name)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * (1 + b.abs().max().item()), msg=name)
    torch.testing.assert_close(ours.stats["entropy"], fp32_tiles.stats["entropy"], rtol=1e-5, atol=1e-5)


def test_switched_off_the_bf16_inputs_take_exactly_the_fp32_path(monkeypatch):
    """LOGO_KERNELS_BF16_DOT=0: bf16 inputs give what their fp32 conversion gives (gradients rounded to bf16)."""
    monkeypatch.setenv(cpp.BF16_DOT_ENV, "0")
    assert not cpp.bf16_dot_enabled()
    hidden, weight, targets, bias, g, _, _ = _case(40, 300, 20, seed=4)
    half = run_fused(hidden, weight, targets, bias, g, backend="cpp")
    full = run_fused(hidden.float(), weight.float(), targets, bias.float(), g, backend="cpp")
    assert torch.equal(half.logp, full.logp) and torch.equal(half.lse, full.lse)
    for name in ("d_hidden", "d_weight", "d_bias"):
        assert torch.equal(getattr(half, name), getattr(full, name).bfloat16()), name


def test_an_empty_hidden_dimension_gives_empty_sums():
    """D = 0 at the raw ops (the Python entry refuses it earlier): the logits are 0 and the products with an empty
    weight tile empty sums — an empty packed tile once read as 'not packed'."""
    hidden, weight = torch.zeros(3, 0, dtype=torch.bfloat16), torch.zeros(5, 0, dtype=torch.bfloat16)
    targets = torch.tensor([0, 1, 4])
    out = torch.ops.logo_kernels.linear_logprobs_fwd(hidden, weight, None, targets, 1.0, 1.0, 0.0, 16, 512, True,
                                                      False, False, False, False, 1 << 30, False, 128, 0.0, 0.0, None)
    torch.testing.assert_close(out[0], torch.full((3,), -math.log(5.0)))
    grads = torch.ops.logo_kernels.linear_logprobs_bwd(torch.ones(3), None, None, hidden, weight, None, targets, out[1],
                                                       None, 1.0, 1.0, 0.0, 16, 512, True, True, False, 1 << 30, None,
                                                       128, None)
    assert grads[0].shape == (3, 0) and grads[1].shape == (5, 0)


def test_the_report_names_the_bf16_tile_path(monkeypatch):
    from logo_kernels.__main__ import format_report, report

    line = next(line for line in format_report(report()).splitlines() if "cpp bf16 tiles" in line)
    assert line.endswith("bf16 products (AVX512-BF16)")
    monkeypatch.setenv(cpp.BF16_DOT_ENV, "0")
    assert report()["extension"]["bf16 tiles"] == "converted to fp32"

"""Bad input to linear_logprobs gets a clear error that names the argument / position at fault."""
import os

import pytest
import torch

import logo_kernels as lk


def args(n=6, vocab=10, dim=4, dtype=torch.float32):
    return torch.randn(n, dim, dtype=dtype), torch.randn(vocab, dim, dtype=dtype), torch.randint(0, vocab, (n,))


def test_target_out_of_range_names_first_bad_position_and_value(backend):
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(10, 4)
    targets = torch.tensor([[1, 2, 3], [-100, 10, -5]])
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = 10 is outside \[0, V=10\).*ignore_index \(-100\)"):
        lk.linear_logprobs(hidden, weight, targets, backend=backend)


def test_negative_target_that_is_not_ignore_index():
    hidden, weight, targets = args()
    targets[4] = -1
    with pytest.raises(ValueError, match=r"targets\[4\] = -1"):
        lk.linear_logprobs(hidden, weight, targets)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda h, w, t: (h, w[:, :3], t), ValueError, r"hidden last dim 4 != weight.shape\[1\] = 3"),
        (lambda h, w, t: (h, w[0], t), ValueError, r"weight must have shape \[V, D\]"),
        (lambda h, w, t: (h, w, t[:5]), ValueError, r"targets shape \(5,\) must equal hidden.shape\[:-1\]"),
        (lambda h, w, t: (h, w.double(), t), TypeError, r"weight dtype torch.float64 must match hidden dtype"),
        (lambda h, w, t: (h.int(), w, t), TypeError, r"hidden must be float32, bfloat16 or float16"),
        (lambda h, w, t: (h, w, t.float()), TypeError, r"targets must be an integer tensor"),
        (lambda h, w, t: (h, w[:0], t), ValueError, r"empty vocabulary"),
        (lambda h, w, t: (h[:, :0], w[:, :0], t), ValueError, r"no hidden dimension \(D = 0\)"),
        (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
        (lambda h, w, t: (h, w.to("meta"), t), ValueError, r"must be on one device"),
    ],
    ids=["dim-mismatch", "weight-1d", "targets-shape", "dtype-mismatch", "int-hidden", "float-targets",
         "empty-vocab", "no-hidden-dim", "not-a-tensor", "device-mismatch"],
)
def test_shape_dtype_device_errors(mutate, error, message):
    with pytest.raises(error, match=message):
        lk.linear_logprobs(*mutate(*args()))


def test_bias_errors():
    hidden, weight, targets = args()
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \(10,\)"):
        lk.linear_logprobs(hidden, weight, targets, torch.randn(9))
    with pytest.raises(TypeError, match="bias dtype"):
        lk.linear_logprobs(hidden, weight, targets, torch.randn(10, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(softcap=-1.0), "softcap must be None or a finite number > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lk.linear_logprobs(*args(), **kwargs)


def test_cpp_backend_refuses_float64():
    if "cpp" not in lk.available_backends():
        pytest.skip("C++ extension not built")
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        lk.linear_logprobs(*args(dtype=torch.float64), backend="cpp")


def test_triton_backend_on_cpu_needs_the_interpreter():
    import subprocess
    import sys

    code = ("import torch, logo_kernels as lk\n"
            "try:\n    lk.linear_logprobs(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), backend='triton')\n"
            "except ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "backend='triton' runs on CUDA tensors" in out and "TRITON_INTERPRET=1" in out




# ---- validation by class (issue: no silent wrong answers) ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_targets_are_range_checked_as_integers(backend, dtype):
    """uint8 156 is not -100 (comparing a uint8 tensor with -100 wraps it to 156): it is out of range."""
    hidden, weight = torch.randn(4, 8), torch.randn(100, 8)
    high = 156 if dtype == torch.uint8 else 120
    targets = torch.tensor([high, 1, 2, 3]).to(dtype)
    with pytest.raises(ValueError, match=rf"targets\[0\] = {high} is outside \[0, V=100\)"):
        lk.linear_logprobs(hidden, weight, targets, backend=backend)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_valid_small_integer_targets_are_accepted(backend, dtype):
    hidden, weight = torch.randn(4, 8), torch.randn(300, 8)
    values = [120, 1, 2, 3] if dtype != torch.uint8 else [250, 1, 2, 3]
    expected = lk.linear_logprobs(hidden, weight, torch.tensor(values), backend=backend)
    got = lk.linear_logprobs(hidden, weight, torch.tensor(values).to(dtype), backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bool_targets_and_bool_ignore_index_are_refused():
    hidden, weight, targets = args()
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        lk.linear_logprobs(hidden, weight, targets.bool())
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lk.linear_logprobs(hidden, weight, targets, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lk.linear_logprobs(hidden, weight, targets, ignore_index=-100.0)


def test_double_backward_is_a_clear_error(backend):
    """A gradient penalty through the op would silently get no second-order term: it raises instead."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logp = lk.linear_logprobs(hidden, weight, torch.randint(0, 11, (5,)), backend=backend)
    (grad,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once: its gradients carry no graph"):
        grad.square().sum().backward()


@pytest.mark.parametrize("where", ["hidden", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_hidden_or_weight_is_refused(backend, where, value):
    hidden, weight, targets = args()
    (hidden if where == "hidden" else weight)[2, 1] = value
    with pytest.raises(ValueError, match=rf"{where}\[2, 1\] = {value}: {where} must be finite"):
        lk.linear_logprobs(hidden, weight, targets, backend=backend)


def test_bias_policy_minus_inf_masks_nan_and_plus_inf_refused(backend):
    hidden, weight, targets = args()
    bias = torch.zeros(10)
    bias[9] = float("-inf")
    targets = targets % 9
    logp = lk.linear_logprobs(hidden, weight, targets, bias, backend=backend)
    reference = torch.log_softmax(hidden @ weight[:9].T, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(logp, reference, rtol=1e-5, atol=1e-5)
    masked_target = lk.linear_logprobs(hidden, weight, torch.full((6,), 9), bias, backend=backend)
    assert torch.isneginf(masked_target).all()  # probability 0, as the materialised computation says
    for bad, message in ((float("nan"), "not NaN or \\+inf"), (float("inf"), "not NaN or \\+inf")):
        bias[3] = bad
        with pytest.raises(ValueError, match=rf"bias\[3\] = .*{message}"):
            lk.linear_logprobs(hidden, weight, targets, bias, backend=backend)
    with pytest.raises(ValueError, match="bias is -inf for every vocabulary entry"):
        lk.linear_logprobs(hidden, weight, targets, torch.full((10,), float("-inf")), backend=backend)


def test_logits_that_overflow_float32_are_refused_not_nan(backend):
    hidden, weight, targets = args()
    hidden[3] = 1e30
    with pytest.raises(FloatingPointError, match="logits of token 3 overflow float32"):
        lk.linear_logprobs(hidden, weight * 1e15, targets, backend=backend)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(logit_scale=0.0), ValueError, "logit_scale must be a finite number > 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be a finite number > 0"),
    (dict(temperature=True), ValueError, "temperature must be a finite number > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be None or a finite number > 0"),
    (dict(outputs="logp"), TypeError, "outputs must be None or a non-empty tuple"),
    (dict(outputs=()), TypeError, "outputs must be None or a non-empty tuple"),
    (dict(outputs=("logp", "entropy", "logp")), ValueError, "names a statistic twice"),
    (dict(outputs=("logits",)), ValueError, r"unknown name\(s\) \['logits'\]"),
    (dict(outputs=("logp",), return_lse=True), TypeError, "return_lse applies to outputs=None only"),
    (dict(chunk_size=True), ValueError, "chunk_size must be a positive int"),
    (dict(deterministic="yes"), TypeError, "deterministic must be None or a bool"),
])
def test_more_option_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        lk.linear_logprobs(*args(), **kwargs)


def test_token_stats_fields_and_non_differentiable_outputs(backend):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    targets = torch.tensor([1, 2, -100, 4, 5, 6])
    out = lk.linear_logprobs(hidden, weight, targets, outputs=("entropy", "is_top1"), backend=backend)
    assert isinstance(out, lk.TokenStats) and out.logp is None and out.lse is None
    assert out.entropy.requires_grad and not out.is_top1.requires_grad and out.is_top1.dtype == torch.bool
    assert out.entropy[2] == 0 and not out.is_top1[2]
    out.entropy.sum().backward()  # entropy alone carries a gradient
    assert hidden.grad is not None and hidden.grad[2].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finiteness_check_is_exact_when_the_sum_overflows_and_across_chunks(dtype, monkeypatch):
    """The finiteness check sums first (no tensor-sized temporary): finite values whose sum overflows the dtype
    pass, and a bad element is found and named exactly, whatever chunk it falls in."""
    import logo_kernels._validation as validation

    monkeypatch.setattr(validation, "_FINITE_CHUNK", 1000)
    big = torch.full((50, 70), torch.finfo(dtype).max / 4, dtype=dtype)  # finite; the sum overflows
    assert not torch.isfinite(big.sum()) and validation._first_non_finite(big) is None
    for flat, bad in ((0, float("nan")), (999, float("inf")), (1000, float("-inf")), (3499, float("nan"))):
        value = big.clone()
        value.view(-1)[flat] = bad
        assert validation._first_non_finite(value) == flat
        with pytest.raises(ValueError, match=rf"weight\[{flat // 70}, {flat % 70}\]"):
            validation.check_finite_inputs(torch.zeros(2, 70, dtype=dtype), value, None)
    assert validation._first_non_finite(big[:, ::2]) is None  # non-contiguous

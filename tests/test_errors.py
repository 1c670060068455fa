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
        (lambda h, w, t: (h.numpy(), w, t), TypeError, r"hidden must be a torch.Tensor"),
        (lambda h, w, t: (h, w.to("meta"), t), ValueError, r"must be on one device"),
    ],
    ids=["dim-mismatch", "weight-1d", "targets-shape", "dtype-mismatch", "int-hidden", "float-targets",
         "empty-vocab", "not-a-tensor", "device-mismatch"],
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



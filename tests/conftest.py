import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; the variable must be set
# before any @triton.jit decorator runs (logo_kernels imports its kernels lazily, at the first launch).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logo_kernels  # noqa: E402

CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in logo_kernels.available_backends()]


def pytest_report_header(config):
    return f"logo_kernels backends: {logo_kernels.available_backends()}"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param

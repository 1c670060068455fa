import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import logo_kernels  # noqa: E402

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in logo_kernels.available_backends()]


def pytest_report_header(config):
    return f"logo_kernels backends: {logo_kernels.available_backends()}"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param

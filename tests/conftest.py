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

# Backends that run on CPU tensors: triton only through the interpreter (on a GPU machine it runs CUDA tensors, in
# the gpu-marked tests).
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in logo_kernels.available_backends()
                and (b != "triton" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))]


def pytest_report_header(config):
    return f"logo_kernels backends: {logo_kernels.available_backends()}"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests are skipped, with the reason, where no CUDA device exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run them with `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_nlp_path():
    """A trained spaCy NER + POS pipeline (tests/ner_pipeline.py), trained once per version of that file and of
    spaCy (~15 s) and kept under ~/.cache/logo-kernels ($XDG_CACHE_HOME)."""
    pytest.importorskip("spacy")
    from ner_pipeline import cached_path

    return cached_path()

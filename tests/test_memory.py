"""Deterministic memory bounds: the fused op never holds an [N, V] logits tensor."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import logo_kernels as lk


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns while active (views excluded: they
    allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def test_no_allocation_of_n_times_v_elements(backend):
    n, vocab, dim = 2048, 50_000, 16
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = -100  # exercise the compaction path too
    with LargestTensor() as mode:
        logp = lk.linear_logprobs(hidden, weight, targets, backend=backend)
        (logp * torch.randn(n)).sum().backward()
    # The torch backend's chunks are bounded by its 256 MiB workspace (3 fp32 [chunk, V] buffers).
    assert mode.largest < n * vocab // 4, f"{mode.op} returned {mode.largest} elements (N*V = {n * vocab})"


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_the_forward_allocates_nothing_of_the_heads_size(backend, frozen):
    """Validation and the forward read the [V, D] head without copying it (no |W| or finiteness masks: those would
    cost ~1.7x the head — 1.7 GiB for a bf16 128K x 4096 head); only a trainable head's backward returns dW."""
    n, vocab, dim = 16, 20_000, 256  # [n, V] tiles (the torch backend's chunk) stay below V*D/4
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.05).requires_grad_(not frozen)
    targets = torch.randint(0, vocab, (n,))
    with LargestTensor() as mode:
        lk.linear_logprobs(hidden, weight, targets, backend=backend, outputs=("logp", "entropy"))
    assert mode.largest < vocab * dim // 4, f"{mode.op} returned {mode.largest} elements (V*D = {vocab * dim})"


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[4])
    import harness
    import logo_kernels as lk
    n, vocab, dim = map(int, sys.argv[1:4])
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim).mul_(0.1).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    grad = torch.randn(n)
    # warm up (thread pools, MKL buffers) at a small size, then measure the peak over the baseline
    lk.linear_logprobs(hidden[:64], weight[:1000], targets[:64] % 1000, backend="cpp").sum().backward()
    hidden.grad = weight.grad = None
    def step():
        (lk.linear_logprobs(hidden, weight, targets, backend="cpp") * grad).sum().backward()
    result = harness.time_runs(step, repeats=1, warmup=0)
    print(json.dumps({"extra_bytes": result["peak_extra_mib"] * 2**20}))
""")
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_cpp_peak_memory_is_a_small_fraction_of_the_logits():
    if "cpp" not in lk.available_backends():
        pytest.skip("C++ extension not built")
    n, vocab, dim = 8192, 32768, 64
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n), str(vocab), str(dim), BENCH_DIR], check=True,
                         capture_output=True, text=True)
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
    logits_bytes = n * vocab * 4  # what one fp32 logits tensor would take (1 GiB); naive holds several
    # Unavoidable: the gradients (dH [N, D] and dW [V, D], fp32) plus tiles; everything else must be small.
    grads_bytes = (n + vocab) * dim * 4
    assert extra < grads_bytes + 0.05 * logits_bytes, (
        f"cpp fwd+bwd grew RSS by {extra / 2**20:.1f} MiB; logits would be {logits_bytes / 2**20:.0f} MiB")

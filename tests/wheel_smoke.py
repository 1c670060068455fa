"""Smoke test of an installed (non-editable) logo-kernels, run from outside the source tree by `make wheel-check`:
the packages import from site-packages, the C++ extension loads and was built for this torch, the op and the
LOGO loss match a float64 reference forward and backward, the shipped corpus is there, the report runs."""
import os
import subprocess
import sys

import torch

import logo
import logo_kernels as lk
from logo.data.corpus import shipped_text
from logo_kernels.backends import cpp

here = os.getcwd()
for module in (lk, logo):
    assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}, not the wheel"
assert not os.path.exists(os.path.join(here, "logo_kernels")), "run me outside the source tree"
assert lk.__version__ == logo.__version__, (lk.__version__, logo.__version__)
assert "cpp" in lk.available_backends(), cpp.unavailable_reason()
built = cpp.built_torch_version(cpp.importlib.util.find_spec("logo_kernels._C").origin)
assert built == torch.__version__, f"extension built for {built}, running {torch.__version__}"

torch.manual_seed(0)
hidden = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
weight = torch.randn(301, 24, dtype=torch.float64, requires_grad=True)
targets = torch.randint(0, 301, (37,))
reference = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
grads = torch.autograd.grad(reference.sum(), (hidden, weight))
h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
for backend in ("cpp", "torch"):
    out = lk.linear_logprobs(h32, w32, targets, backend=backend)
    got = torch.autograd.grad(out.sum(), (h32, w32))
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-4)
    for g, r in zip(got, grads):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4)
    print(f"linear_logprobs backend={backend}: matches the fp64 reference (forward and gradients)")
cu_seqlens = torch.arange(0, 37, 3, dtype=torch.int32)  # 4 examples x (chosen + 2 rejected) x 3 tokens
loss = lk.LogoLoss(num_negatives=2)(h32[:36], w32, targets[:36], cu_seqlens)
loss.loss.backward()
assert torch.isfinite(loss.loss) and torch.isfinite(w32.grad).all(), loss
assert len(shipped_text()) > 5_000  # the shipped public-domain text (9 KB)
report = subprocess.run([sys.executable, "-m", "logo_kernels"], check=True, capture_output=True, text=True).stdout
assert "backend cpp        available" in report, report
print(f"logo-kernels {lk.__version__} wheel: OK (torch {torch.__version__}, {os.path.dirname(lk.__file__)})")

# every package and module of the source tree is in the wheel (a hand-kept list once left logo.attention out);
# files are compared, not imported: the peers the train/eval modules need are not in this venv
if len(sys.argv) > 1:
    source = sys.argv[1]
    missing = []
    for package in ("logo_kernels", "logo"):
        installed = os.path.dirname(sys.modules[package].__file__)
        for base, dirs, names in os.walk(os.path.join(source, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                if name.endswith(".py") or base.endswith("assets"):
                    relative = os.path.relpath(os.path.join(base, name), os.path.join(source, package))
                    if not os.path.exists(os.path.join(installed, relative)):
                        missing.append(f"{package}/{relative}")
    assert not missing, f"not in the wheel: {missing}"
    print("every module and asset of the source tree is in the wheel")

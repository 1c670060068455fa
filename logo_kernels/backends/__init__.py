"""The one dispatch point: picks a backend of the fused linear -> log-prob op by device and availability.

``auto``: CUDA tensors -> ``triton``, CPU tensors -> ``cpp``, anything else (and float64) -> ``torch``; when the
preferred backend cannot run (not installed, not built) ``auto`` falls back to ``torch`` with a one-line warning,
once. An explicitly named backend that cannot run the tensors raises, with the backend's own reason. Each
backend states its limits itself (``unsupported_reason(device, dtype)``); this module only asks them.
``triton`` on CPU tensors runs Triton's interpreter and needs ``TRITON_INTERPRET=1`` (set before importing
logo_kernels): that is how its kernels are tested here.
"""
from __future__ import annotations

import warnings

import torch

from . import cpp as _cpp
from . import triton as _triton
from .base import (FILTER_BLOCK, FILTER_MASS_FACTOR, Backend, Filter, GradsNeeded, KernelOptions, LogitTransform,
                   RowStats, live_pairs, mean_logit_order)
from .torch_chunked import TorchChunkedBackend

BACKENDS = ("auto", "torch", "cpp", "triton")

_IMPLEMENTATIONS = {"torch": TorchChunkedBackend(), "cpp": _cpp.CppBackend(), "triton": _triton.TritonBackend()}
_PREFERRED = {"cuda": "triton", "cpu": "cpp"}
_warned = set()


def _warn_fallback(impl, reason: str) -> None:
    if impl.name not in _warned:
        _warned.add(impl.name)
        warnings.warn(f"logo_kernels: {impl.label} not available, using the slower torch backend ({reason})",
                      RuntimeWarning, stacklevel=5)


def available_backends() -> list[str]:
    """Backends that can run in this installation (``auto`` always can): ``cpp`` when the extension is built;
    ``triton`` where a CUDA device exists or the Triton interpreter is on."""
    names = ["auto", "torch"]
    if _IMPLEMENTATIONS["cpp"].unsupported(torch.device("cpu"), torch.float32) is None:
        names.append("cpp")
    triton_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if _IMPLEMENTATIONS["triton"].unsupported(triton_device, torch.float32) is None:
        names.append("triton")
    return names


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs ``dtype`` tensors on ``device`` (module doc); raises the backend's own error when a
    named backend cannot."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        preferred = _PREFERRED.get(device.type)
        if preferred is None or dtype == torch.float64:
            return _IMPLEMENTATIONS["torch"]
        impl = _IMPLEMENTATIONS[preferred]
        reason = impl.missing_reason()
        if reason is not None:
            _warn_fallback(impl, reason)
            return _IMPLEMENTATIONS["torch"]
        return impl if impl.unsupported(device, dtype) is None else _IMPLEMENTATIONS["torch"]
    impl = _IMPLEMENTATIONS[name]
    error = impl.unsupported(device, dtype)
    if error is not None:
        raise error
    return impl


__all__ = ["FILTER_BLOCK", "FILTER_MASS_FACTOR", "Backend", "BACKENDS", "Filter", "live_pairs", "mean_logit_order", "GradsNeeded", "KernelOptions", "LogitTransform", "RowStats", "available_backends",
           "resolve_backend"]

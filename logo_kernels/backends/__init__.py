"""The one dispatch point: picks a backend of the fused linear -> log-prob op by device and availability.

``auto``: CPU tensors -> ``cpp`` if the C++ extension is built, else ``torch`` (with a one-line warning,
once); CUDA tensors -> ``triton`` if Triton is installed, else ``torch`` (warned once); float64 -> ``torch``
(the only backend with fp64 accumulation). ``triton`` on CPU tensors runs Triton's interpreter and needs
``TRITON_INTERPRET=1`` (set before importing logo_kernels): that is how its kernels are tested here.
"""
from __future__ import annotations

import warnings

import torch

from . import cpp as _cpp
from . import triton as _triton
from .base import Backend, GradsNeeded, LogitTransform
from .torch_chunked import TorchChunkedBackend

BACKENDS = ("auto", "torch", "cpp", "triton")

_TORCH = TorchChunkedBackend()
_CPP = _cpp.CppBackend() if _cpp.is_available() else None
_TRITON = _triton.TritonBackend() if _triton.is_available() else None
_warned = set()


def _warn_fallback(missing: str, reason: str) -> None:
    if missing not in _warned:
        _warned.add(missing)
        warnings.warn(f"logo_kernels: {missing} not available, using the slower torch backend ({reason})",
                      RuntimeWarning, stacklevel=4)


def available_backends() -> list[str]:
    """Backends that can run in this installation (``auto`` always can); ``triton`` where a CUDA device
    exists or the Triton interpreter is on."""
    triton_runs = _TRITON is not None and (torch.cuda.is_available() or _triton.interpreting())
    return ["auto", "torch"] + (["cpp"] if _CPP is not None else []) + (["triton"] if triton_runs else [])


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if dtype == torch.float64:
            return _TORCH
        if device.type == "cuda":
            if _TRITON is None:
                _warn_fallback("Triton", _triton.unavailable_reason())
                return _TORCH
            return _TRITON
        if device.type != "cpu":
            return _TORCH
        if _CPP is None:
            _warn_fallback("C++ extension", _cpp.unavailable_reason())
            return _TORCH
        return _CPP
    if name == "torch":
        return _TORCH
    if name == "cpp":
        if _CPP is None:
            raise RuntimeError(f"backend='cpp' requested but the C++ extension is not available: "
                               f"{_cpp.unavailable_reason()}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got device {device}")
        if dtype == torch.float64:
            raise TypeError("backend='cpp' accumulates in fp32 and takes float32/bfloat16/float16 inputs; "
                            "use backend='torch' for float64")
        return _CPP
    if _TRITON is None:
        raise RuntimeError(f"backend='triton' requested but {_triton.unavailable_reason()}")
    if device.type == "cpu" and not _triton.interpreting():
        raise ValueError("backend='triton' runs on CUDA tensors (on CPU tensors only under Triton's interpreter: "
                         "set TRITON_INTERPRET=1 before importing logo_kernels)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors, got device {device}")
    if dtype == torch.float64:
        raise TypeError("backend='triton' takes float32/bfloat16/float16 inputs; use backend='torch' for float64")
    return _TRITON


__all__ = ["Backend", "BACKENDS", "GradsNeeded", "LogitTransform", "available_backends", "resolve_backend"]

"""The one dispatch point: picks a backend of the fused linear -> log-prob op by device and availability.

``auto``: CPU tensors -> ``cpp`` if the C++ extension is built, else ``torch`` (with a one-line warning,
once); float64 -> ``torch`` (the only backend with fp64 accumulation); CUDA tensors -> ``torch`` until the
Triton backend exists.
"""
from __future__ import annotations

import warnings

import torch

from . import cpp as _cpp
from .base import Backend, GradsNeeded, LogitTransform
from .torch_chunked import TorchChunkedBackend

BACKENDS = ("auto", "torch", "cpp", "triton")

_TORCH = TorchChunkedBackend()
_CPP = _cpp.CppBackend() if _cpp.is_available() else None
_warned_fallback = False


def _warn_cpp_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "logo_kernels: C++ extension not available, using the slower torch backend "
            f"({_cpp.unavailable_reason()})",
            RuntimeWarning,
            stacklevel=4,
        )


def available_backends() -> list[str]:
    """Backends that can run in this installation (``auto`` always can)."""
    return ["auto", "torch"] + (["cpp"] if _CPP is not None else [])


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cpu" or dtype == torch.float64:
            return _TORCH
        if _CPP is None:
            _warn_cpp_fallback()
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
    raise RuntimeError("backend='triton' is not available in this version (CPU backends: torch, cpp)")


__all__ = ["Backend", "BACKENDS", "GradsNeeded", "LogitTransform", "available_backends", "resolve_backend"]

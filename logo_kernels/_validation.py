"""Argument checks of the public ops: every message names the argument (and position) at fault."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_linear_inputs(hidden, weight, targets, bias) -> None:
    """Types, shapes, dtypes and devices of ``linear_logprobs``' tensor arguments."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)

    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16 (float64 with backend='torch'), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    if targets.dtype not in _INT_DTYPES:
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")

    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden last dim {hidden.shape[-1]} != weight.shape[1] = {dim} (D)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V] = ({vocab},), got {tuple(bias.shape)}")

    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, targets and bias must be on one device, got {sorted(map(str, devices))}")


def check_transform(temperature: float, softcap: float | None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, vocab) that is not ignore_index."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if not bool(bad.any()):
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(targets.shape)))
    index = ", ".join(map(str, position))
    value = int(targets.reshape(-1)[flat])
    raise ValueError(
        f"targets[{index}] = {value} is outside [0, V={vocab}) and is not ignore_index ({ignore_index})"
    )

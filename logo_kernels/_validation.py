"""Argument checks of the public ops, by class: every message names the argument (and position) at fault.

Non-finite inputs (the policy, identical for every backend):

* ``hidden`` and ``weight`` must be finite: a NaN or ±inf is a ``ValueError`` naming the first bad element;
* ``bias`` may hold ``-inf`` (it removes tokens from the softmax, e.g. a vocabulary mask), not NaN or +inf,
  and not ``-inf`` everywhere;
* logits that overflow float32 (finite inputs whose products exceed ~3.4e38) are a ``FloatingPointError``
  naming the first token: the op never returns a NaN for finite inputs. A target whose bias is ``-inf``
  has probability 0: log-prob ``-inf``, as the materialised computation gives.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
OUTPUT_NAMES = ("logp", "lse", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _position(flat_index: int, shape) -> str:
    if not shape:
        return ""
    index = torch.unravel_index(torch.tensor(flat_index), tuple(shape))
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def check_linear_inputs(hidden, weight, targets, bias) -> None:
    """Types, shapes, dtypes and devices of ``linear_logprobs``' tensor arguments."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)

    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16 (float64 with backend='torch'), got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES or (weight.dtype != hidden.dtype and torch.float64 in (weight.dtype,
                                                                                                 hidden.dtype)):
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype} (or both be among float32, "
                        "bfloat16, float16: mixed inputs compute in float32)")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"targets must be an integer tensor (int64, int32, int16, int8 or uint8), got {targets.dtype}")

    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if dim == 0:
        raise ValueError("weight and hidden have no hidden dimension (D = 0): every logit would be the bias alone")
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


_FINITE_CHUNK = 1 << 22  # elements per torch.isfinite pass: its temporaries (|x| and masks) stay ~25 MiB


def _first_non_finite(value: torch.Tensor) -> Optional[int]:
    """Flat index of the first NaN / ±inf of ``value``, or None, without a full-size temporary.

    The sum of a tensor is finite only if every element is (NaN and ±inf propagate; +inf + -inf is NaN), and a
    reduction allocates nothing of the tensor's size — ``torch.isfinite`` on the whole tensor would (|x| and two
    masks: ~1.7x the tensor). A non-finite sum (a bad element, or finite values whose sum overflows the dtype)
    is then resolved exactly, chunk by chunk."""
    with torch.no_grad():  # a check, not part of the graph
        if bool(torch.isfinite(value.sum())):
            return None
        flat = value.reshape(-1)
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            bad = ~torch.isfinite(flat[start:start + _FINITE_CHUNK])
            if bool(bad.any()):
                return start + int(bad.nonzero()[0, 0])
    return None  # finite values whose sum overflowed


def check_finite_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The non-finite policy of the module doc (one reduction over each tensor; no tensor-sized temporaries)."""
    for name, value in (("hidden", hidden), ("weight", weight)):
        if value.device.type == "meta" or value.numel() == 0:
            continue
        flat = _first_non_finite(value)
        if flat is not None:
            bad = value.reshape(-1)[flat].item()
            raise ValueError(f"{name}{_position(flat, value.shape)} = {bad}: {name} must be finite (no NaN or inf)")
    if bias is None or bias.device.type == "meta":
        return
    bad_mask = torch.isnan(bias) | (bias == float("inf"))
    if bool(bad_mask.any()):
        flat = int(bad_mask.nonzero()[0, 0])
        raise ValueError(f"bias[{flat}] = {bias[flat].item()}: bias may hold -inf (a masked token) but not NaN or +inf")
    if bool((bias == float("-inf")).all()):
        raise ValueError("bias is -inf for every vocabulary entry: no token has a non-zero probability")


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


def _positive_finite(name: str, value, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        kind = "None or a finite number > 0" if optional else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def check_transform(temperature, softcap, logit_scale=1.0) -> None:
    _positive_finite("temperature", temperature)
    _positive_finite("softcap", softcap, optional=True)
    _positive_finite("logit_scale", logit_scale)


#: Largest explicit ``filter_eps``: above it the skipped entries are no longer a rounding error's worth.
MAX_FILTER_EPS = 2.0**-7


def auto_filter_eps(*dtypes: torch.dtype) -> float:
    """``filter_eps="auto"``: finfo(eps) / 32 of the least precise of ``dtypes`` — 2^-12 for bf16, 2^-15 for fp16,
    2^-28 for fp32, 2^-57 for fp64 (Cut-Cross-Entropy's rule): an entry skipped this way is at most 1/32 of a unit
    in the last place of the largest probability (<= 1) the dtype can hold."""
    return max(torch.finfo(d).eps for d in dtypes) / 32


def check_filter_eps(filter_eps, *dtypes: torch.dtype) -> Optional[float]:
    """``filter_eps``: None (exact), "auto" (:func:`auto_filter_eps`) or a float in (0, MAX_FILTER_EPS] -> float."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, 'auto' or a float in (0, 2^-7], got {filter_eps!r}")
        return auto_filter_eps(*dtypes)
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, numbers.Real):
        raise TypeError(f"filter_eps must be None, 'auto' or a float in (0, 2^-7], got {filter_eps!r}")
    value = float(filter_eps)
    if not (0.0 < value <= MAX_FILTER_EPS):  # also refuses NaN
        raise ValueError(f"filter_eps must lie in (0, 2^-7 = {MAX_FILTER_EPS}] (None for exact gradients), "
                         f"got {filter_eps!r}")
    return value


def check_outputs(outputs) -> Optional[tuple]:
    """``outputs``: None or a non-empty sequence of distinct names from OUTPUT_NAMES -> a tuple."""
    if outputs is None:
        return None
    if isinstance(outputs, str) or not isinstance(outputs, Sequence) or not outputs:
        raise TypeError(f"outputs must be None or a non-empty tuple of names from {OUTPUT_NAMES}, got {outputs!r}")
    unknown = [o for o in outputs if o not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs: unknown name(s) {unknown}; choose from {OUTPUT_NAMES}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs names a statistic twice: {tuple(outputs)}")
    return tuple(outputs)


def canonical_targets(targets: torch.Tensor) -> torch.Tensor:
    """int64 targets, converted *before* any comparison: comparing a small-int tensor to a Python int wraps the
    int to the tensor's dtype (uint8 156 == -100), which would let out-of-range ids through."""
    return targets if targets.dtype == torch.int64 else targets.to(torch.int64)


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, vocab) that is not ignore_index (int64 targets)."""
    assert targets.dtype == torch.int64, "convert with canonical_targets first"
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if not bool(bad.any()):
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    value = int(targets.reshape(-1)[flat])
    raise ValueError(
        f"targets{_position(flat, targets.shape)} = {value} is outside [0, V={vocab}) and is not ignore_index "
        f"({ignore_index})"
    )


def check_finite_lse(lse: torch.Tensor, kept: torch.Tensor) -> None:
    """Finite inputs whose logits overflow float32 give a non-finite log-sum-exp: refuse to return it."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        row = int(kept[bad.nonzero()[0, 0]])
        raise FloatingPointError(
            f"the logits of token {row} overflow float32 (|logit| > 3.4e38, log-sum-exp {lse[bad][0].item()}): "
            "scale hidden/weight down (finite inputs never give NaN here; a materialised computation would)"
        )

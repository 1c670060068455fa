"""What every backend of the fused linear -> log-prob op implements.

Backends see compacted inputs only: hidden [n, D] and weight [V, D] contiguous, of one dtype; bias [V] or
None; targets [n] int64, all in [0, V). They return fp32 (fp64 for fp64 inputs) logp and lse [n], and
gradients in the dtypes of their inputs (None for a gradient not asked for).

With ``with_basis`` the forward also returns the gradient basis Q = (softmax(x) * slope) @ W [n, D]
(fp32; slope = the softcap derivative 1 - (x/cap)^2, or 1), from which the dHidden of a frozen head is
elementwise: dH = (g * slope_t * W[t] + (g_lse - g) * Q) / temperature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch

Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class LogitTransform:
    """logits = (hidden @ weight.T + bias) / temperature, then softcap * tanh(logits / softcap) if set."""

    temperature: float = 1.0
    softcap: Optional[float] = None

    @property
    def kernel_softcap(self) -> float:
        """The softcap as the C++ / Triton kernels take it: 0.0 for none."""
        return 0.0 if self.softcap is None else float(self.softcap)

    def softcap_slope(self, capped: torch.Tensor) -> torch.Tensor:
        """d(softcap * tanh(z / softcap)) / dz = 1 - (x / softcap)^2, from the capped logits x."""
        return 1.0 - (capped / self.softcap).square()


@dataclass(frozen=True)
class GradsNeeded:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class Backend(Protocol):
    name: str

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, chunk_size: Optional[int],
                with_basis: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """-> (logp [n], lse [n], basis [n, D] or None)."""

    def backward(self, grad_logp, grad_lse, hidden, weight, bias, targets, lse, transform: LogitTransform,
                 chunk_size: Optional[int], needed: GradsNeeded) -> Grads:
        """grad_logp [n] fp32, grad_lse [n] fp32 or None -> (d_hidden, d_weight, d_bias)."""

"""What every backend of the fused linear -> log-prob op implements.

Backends see compacted, validated inputs only: hidden [n, D] and weight [V, D] contiguous, of one dtype;
bias [V] or None; targets [n] int64, all in [0, V). They return fp32 (fp64 for fp64 inputs) per-token
statistics and gradients in the dtypes of their inputs (None for a gradient not asked for).

The logits are ``x = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature`` (:class:`LogitTransform`,
the order of Hugging Face models and TRL: the model's own scale and softcap, then the sampling temperature).

With ``with_basis`` the forward also returns the gradient basis Q = (softmax(x) * slope) @ W [n, D] (fp32;
slope = the derivative of the softcap, 1 without), from which the dHidden of a frozen head is elementwise:
dH = (g * slope_t * W[t] + (g_lse - g) * Q) * logit_scale / temperature.

Gradient w.r.t. the logits (every backend): with g, g_lse, g_H the upstream gradients of logp, lse and
entropy H, p = softmax(x) and log p = x - lse,

    dL/dx_j = g * 1[j = t] + p_j * (a + c * log p_j),   a = g_lse - g - g_H * H,   c = -g_H

(dH/dx_j = -p_j (log p_j + H)), then times ``d x / d(hidden @ weight.T + bias)`` = logit_scale * slope / temperature.

Gradient filtering (:class:`Filter`, ``filter_eps``): the vocabulary, walked in ``Filter.order``, is cut into blocks;
a (token, block) pair whose largest probability is below ``eps`` and which does not hold the token's target is
skipped by the backward (its dL/dx taken as 0), the least probable first, as long as the token's skipped
probability mass stays <= FILTER_MASS_FACTOR * eps, and a token that would keep at least FILTER_KEEP_ALL_SHARE of its
blocks keeps them all (:func:`live_pairs`). The C++ and torch backends decide per (token, block of
:data:`FILTER_BLOCK` rows); the Triton kernels per tile (a block of tokens x their BLOCK_V), skipping a tile only
when every token of it may be skipped — never more than the per-token rule.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import FrozenSet, Optional, Protocol, Tuple

import torch

Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]

#: Per-token statistics a forward can compute besides logp and lse (each only when asked for).
EXTRA_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class LogitTransform:
    """x = softcap * tanh(logit_scale * z / softcap) / temperature with z = hidden @ weight.T + bias
    (no tanh when ``softcap`` is None)."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    @property
    def kernel_softcap(self) -> float:
        """The softcap as the C++ / Triton kernels take it: 0.0 for none."""
        return 0.0 if self.softcap is None else float(self.softcap)

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def chain(self) -> float:
        """d x / d(capped logit) times d(scaled logit) / dz, without the softcap slope: logit_scale / temperature."""
        return self.logit_scale / self.temperature

    def pre_cap(self, z: torch.Tensor) -> torch.Tensor:
        """u = logit_scale * z / softcap, the argument of the tanh."""
        return z * (self.logit_scale / self.softcap)

    @staticmethod
    def slope_of_pre_cap(u: torch.Tensor) -> torch.Tensor:
        """1 - tanh(u)^2 = 1 / cosh(u)^2: exact where the cap saturates (1 - tanh^2 from the capped value cancels
        to noise there); cosh^2 overflowing to inf gives the right 0."""
        return torch.cosh(u).square_().reciprocal_()


#: Vocabulary rows per skippable block of the C++ and torch backends' filtered backward.
FILTER_BLOCK = 128
#: A token's skipped probability mass is at most this many times ``filter_eps`` (then its remaining blocks are kept):
#: with "auto" (finfo.eps / 32) that is finfo.eps / 2, the dtype's unit roundoff.
FILTER_MASS_FACTOR = 16


#: A token that keeps at least this share of its blocks under the rule keeps them all: skipping the few others costs
#: more (gathered rows, zeroed columns) than computing them, and a backward whose pairs are all live runs the exact
#: walk. Logits without sparsity (Gaussian: the mass cap keeps 99.5 % of the pairs) then cost no backward overhead.
FILTER_KEEP_ALL_SHARE = 0.9


def keep_mostly_live_tokens(live: torch.Tensor) -> torch.Tensor:
    """live [n, blocks] bool with every row that has at least FILTER_KEEP_ALL_SHARE of its blocks live made all live
    (in place; returned)."""
    if live.numel():
        live[live.sum(dim=1) >= math.ceil(FILTER_KEEP_ALL_SHARE * live.shape[1])] = True
    return live


def live_pairs(tile_max: torch.Tensor, tile_lse: torch.Tensor, lse: torch.Tensor, target_tile: torch.Tensor,
               log_eps: float, max_mass: float) -> torch.Tensor:
    """The filter's decision, from each (token, block) pair's maximum logit and log-sum-exp [n, blocks] (fp32 or
    fp64), the tokens' log-sum-exp [n] and the block holding each target [n] -> live [n, blocks] bool.

    A pair may be skipped when its largest probability is below eps (max - lse < log eps) and it does not hold
    the target; of those, each token skips the least probable pairs first while their summed probability stays
    <= ``max_mass`` (a stable sort: ties in block order). A flat distribution, whose tail is all of its mass,
    therefore keeps nearly every pair — and then all of them (:func:`keep_mostly_live_tokens`)."""
    n = tile_max.shape[0]
    log_p_max = tile_max - lse[:, None]
    dead = log_p_max < log_eps
    dead[torch.arange(n, device=dead.device), target_tile] = False
    mass = torch.where(dead, (tile_lse - lse[:, None]).exp(), float("inf"))
    sorted_mass, index = torch.sort(mass, dim=1, stable=True)
    skip = torch.zeros_like(dead).scatter_(1, index, sorted_mass.cumsum(dim=1) <= max_mass)
    return keep_mostly_live_tokens(~skip)


@dataclass(frozen=True, eq=False)
class Filter:
    """Gradient filtering: skip (token, vocabulary block) pairs whose probabilities all lie below ``eps``, at most
    ``FILTER_MASS_FACTOR * eps`` of each token's probability mass (:func:`live_pairs`).

    ``order``: the walk order of the vocabulary ([V] int64 permutation; None = by id), so that blocks group ids
    that are live together (:func:`mean_logit_order`)."""

    eps: float
    order: Optional[torch.Tensor] = None

    @property
    def log_eps(self) -> float:
        return math.log(self.eps)

    @property
    def max_mass(self) -> float:
        return FILTER_MASS_FACTOR * self.eps

    @functools.cached_property
    def position(self) -> Optional[torch.Tensor]:
        """position[id]: where vocabulary row ``id`` sits in the walk (None for the identity)."""
        return None if self.order is None else torch.argsort(self.order)

    def keep(self, log_probs: torch.Tensor, targets: torch.Tensor, block: int = FILTER_BLOCK,
             token_block: int = 1) -> torch.Tensor:
        """[n, V] bool: the entries a backward with this filter keeps, from the log probabilities [n, V] (vocabulary
        in id order) and the targets [n] — the readable form of the rule. ``token_block`` > 1: a tile of that many
        consecutive tokens is kept whole when any of its (token, block) pairs is live (the Triton kernels)."""
        n, vocab = log_probs.shape
        walked = log_probs if self.order is None else log_probs.index_select(1, self.order)
        blocks = -(-vocab // block)
        padded = torch.nn.functional.pad(walked, (0, blocks * block - vocab), value=float("-inf")).view(n, blocks, block)
        position = targets if self.order is None else self.position.index_select(0, targets)
        live = live_pairs(padded.amax(dim=2), torch.logsumexp(padded, dim=2), torch.zeros(n, dtype=log_probs.dtype,
                          device=log_probs.device), position // block, self.log_eps, self.max_mass)
        if token_block > 1:
            tiles = -(-n // token_block)
            grouped = torch.nn.functional.pad(live, (0, 0, 0, tiles * token_block - n))
            live = grouped.view(tiles, token_block, blocks).any(dim=1).repeat_interleave(token_block, dim=0)[:n]
        keep_walked = live.repeat_interleave(block, dim=1)[:, :vocab]
        if self.order is None:
            return keep_walked
        return torch.empty_like(keep_walked).index_copy_(1, self.order, keep_walked)


def mean_logit_order(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The vocabulary by decreasing mean logit over the tokens, mean_t(h_t) . w_j + b_j (one GEMV; the softcap and
    scales are monotone): [V] int64. Ids live for many tokens come first, so that the live entries of a token
    block crowd into few vocabulary blocks (Cut-Cross-Entropy's sort)."""
    mean_hidden = hidden.mean(dim=0, dtype=torch.float32).to(weight.dtype)  # no fp32 copy of hidden
    score = torch.mv(weight, mean_hidden).float()
    if bias is not None:
        score += bias.float()
    return torch.argsort(score, descending=True, stable=True)


@dataclass(frozen=True)
class GradsNeeded:
    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass(frozen=True)
class KernelOptions:
    """chunk_size: tokens per chunk / tile (None: the backend's choice); deterministic: the Triton backward
    without atomics (the other backends are always deterministic)."""

    chunk_size: Optional[int] = None
    deterministic: bool = True


@dataclass
class RowStats:
    """The forward's per-token outputs (fp32 [n]; is_top1 bool [n]); None where not computed."""

    logp: torch.Tensor
    lse: torch.Tensor
    basis: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    live: Optional[torch.Tensor] = None  # with a filter: what the backward visits (backend-specific layout)


class Backend(Protocol):
    name: str
    label: str  # what a user installs or builds to get it ("C++ extension", "Triton")

    def missing_reason(self) -> Optional[str]:
        """Why this backend is not installed / built here, or None."""

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> Optional[Exception]:
        """The error to raise when this backend is asked to run ``dtype`` tensors on ``device`` and cannot
        (RuntimeError: not installed; ValueError: device; TypeError: dtype), or None."""

    def forward(self, hidden, weight, bias, targets, transform: LogitTransform, options: KernelOptions,
                with_basis: bool = False, stats: FrozenSet[str] = frozenset(),
                filtering: Optional[Filter] = None) -> RowStats:
        """Per-token logp, lse and the requested ``stats`` (a subset of EXTRA_STATS); basis with ``with_basis``;
        with ``filtering``, ``live`` for the backward (or None when the backward decides alone)."""

    def backward(self, grad_logp, grad_lse, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                 transform: LogitTransform, options: KernelOptions, needed: GradsNeeded,
                 filtering: Optional[Filter] = None, live: Optional[torch.Tensor] = None) -> Grads:
        """grad_logp [n] fp32; grad_lse, grad_entropy [n] fp32 or None (entropy [n] given with grad_entropy)
        -> (d_hidden, d_weight, d_bias); with ``filtering`` (and the forward's ``live``) skipping what it says."""


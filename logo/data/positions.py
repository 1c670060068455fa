"""Positional indices synthesis (LOGO §3.2.2, App. D): real tokens dressed in a long position window.

A sample has ``prefix`` tokens (system prompt), N context chunks of given lengths, and a tail (question,
then the responses). The k real tokens get position ids spread over a target window K > k; the slack K - k is
what the synthesis distributes:

* ``continuous`` (the paper): every token of chunk c gets the same bias B_c, which places the chunk inside its
  own slot of the slack: with s = (K - k) / N, B_c = c·s + u_c, u_c ~ U{0, .., s}. Chunks stay contiguous,
  the biases are non-decreasing, and the last chunk ends within one slot of K - tail, so the question and the
  responses sit near the top of the window (question-to-context distances up to ~K).
  (Adding N independent gaps U(1, s) cumulatively is NOT this: they sum to (K - k)/2 on average and the tail
  lands near the middle of the window.)
* ``sparse``: token i of chunk c (1-based) gets an offset drawn in [1, c·(K - k)/N], made non-decreasing along
  the sequence (a running maximum), so positions stay strictly increasing while filling the gaps.
* ``slots`` (the authors' builder): the window after the prefix is cut into N + 1 equal slots of
  (K - tail - prefix) / (N + 1); chunk c takes one contiguous window at a random place inside slot c.
* ``mixed``: ``continuous`` with probability ``continuous_ratio`` (paper: 0.9), else ``sparse``.

``python bench/positions_coverage.py`` prints, for each strategy, the mean and max first tail position and the
share of 256 bins of the window the real tokens hit (README "Long context, encoded once").

The prefix keeps 0..prefix-1; the tail starts right after the last context position (all responses of a
sample then start at the same position — they are alternatives). Every strategy returns strictly
increasing positions, all < K, and raises ValueError when the real tokens do not fit the window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

STRATEGIES = ("continuous", "sparse", "slots", "mixed")


@dataclass
class SynthesizedPositions:
    """position ids of the prefix + context tokens [prefix + sum(chunks)] and the first tail position."""

    context: torch.Tensor
    tail_start: int
    strategy: str

    def tail(self, length: int) -> torch.Tensor:
        """Positions of ``length`` tail tokens (question + one response), right after the context."""
        return torch.arange(self.tail_start, self.tail_start + length)


def _check(chunk_lengths: Sequence[int], prefix: int, tail: int, window: int) -> int:
    if not chunk_lengths or any(int(c) <= 0 for c in chunk_lengths):
        raise ValueError(f"chunk_lengths must be a non-empty list of positive ints, got {list(chunk_lengths)}")
    if prefix < 0 or tail < 0:
        raise ValueError(f"prefix ({prefix}) and tail ({tail}) must be >= 0")
    real = prefix + sum(int(c) for c in chunk_lengths) + tail
    if real > window:
        raise ValueError(f"{real} real tokens (prefix {prefix} + context {sum(chunk_lengths)} + tail {tail}) "
                         f"do not fit the position window {window}")
    return real


def _continuous(lengths: List[int], prefix: int, slack: int, generator) -> torch.Tensor:
    n = len(lengths)
    slot = slack / n  # chunk c's bias lies in [c * slot, (c + 1) * slot]
    pieces, start = [], prefix
    for c, length in enumerate(lengths):
        low, high = math.ceil(c * slot), math.floor((c + 1) * slot)
        bias = low + int(torch.randint(0, high - low + 1, (1,), generator=generator)) if high >= low else low
        pieces.append(start + bias + torch.arange(length))
        start += length
    return torch.cat(pieces)


def _sparse(lengths: List[int], prefix: int, slack: int, generator) -> torch.Tensor:
    n = len(lengths)
    chunk_index = torch.repeat_interleave(torch.arange(1, n + 1), torch.tensor(lengths))
    upper = chunk_index * slack // n  # offset of a token of chunk c lies in [1, c * slack / N]
    offsets = (torch.rand(len(chunk_index), generator=generator) * upper).long() + 1
    offsets = torch.minimum(offsets, upper.clamp_min(0))
    offsets = torch.cummax(offsets, dim=0).values  # non-decreasing: positions stay strictly increasing
    return prefix + torch.arange(len(chunk_index)) + offsets.clamp_max(slack)


def _slots(lengths: List[int], prefix: int, tail: int, window: int, generator) -> torch.Tensor:
    n = len(lengths)
    slot = (window - tail - prefix) // (n + 1)
    if max(lengths) > slot:
        raise ValueError(f"strategy 'slots': a chunk of {max(lengths)} tokens does not fit a slot of {slot} "
                         f"positions ((window - tail - prefix) / (N + 1))")
    pieces = []
    for c, length in enumerate(lengths):
        start = prefix + c * slot + int(torch.randint(0, slot - length + 1, (1,), generator=generator))
        pieces.append(torch.arange(start, start + length))
    return torch.cat(pieces)


def synthesize_positions(chunk_lengths: Sequence[int], *, window: int, prefix: int = 0, tail: int = 0,
                         strategy: str = "mixed", continuous_ratio: float = 0.9,
                         generator: Optional[torch.Generator] = None) -> SynthesizedPositions:
    """Position ids for ``prefix`` + context chunks inside ``window`` (module doc), leaving room for
    ``tail`` tokens (question + the longest response) after the context. Seeded by ``generator``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 0.0 <= continuous_ratio <= 1.0:
        raise ValueError(f"continuous_ratio must be in [0, 1], got {continuous_ratio}")
    real = _check(chunk_lengths, prefix, tail, window)
    lengths = [int(c) for c in chunk_lengths]
    if strategy == "mixed":
        draw = float(torch.rand(1, generator=generator))
        strategy = "continuous" if draw < continuous_ratio else "sparse"
    slack = window - real
    if strategy == "continuous":
        context = _continuous(lengths, prefix, slack, generator)
    elif strategy == "sparse":
        context = _sparse(lengths, prefix, slack, generator)
    else:
        context = _slots(lengths, prefix, tail, window, generator)
    positions = torch.cat([torch.arange(prefix), context])
    tail_start = int(positions[-1]) + 1
    assert tail_start + tail <= window, "synthesized positions leave no room for the tail"
    return SynthesizedPositions(positions, tail_start, strategy)

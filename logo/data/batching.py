"""Encoded examples -> shared-prefix packed batches with synthesized position ids.

:func:`collate` gives each example's context chunks positions spread over ``window`` (LOGO's positional
indices synthesis, :mod:`logo.data.positions`), the tail (question) right after the context, and packs
``[prompt | chosen | rejected_1..M]`` into one row per example (:func:`logo.data.packing.pack_rows`).
With ``window=None`` positions are simply 0, 1, 2, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .encoding import EncodedExample
from .packing import PackedBatch, pack_rows
from .positions import STRATEGIES, synthesize_positions


@dataclass(frozen=True)
class PositionSynthesis:
    """How position ids are synthesized: target window K (None: no synthesis), chunk size, strategy."""

    window: Optional[int] = None
    chunk_tokens: int = 512
    strategy: str = "mixed"
    continuous_ratio: float = 0.9

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"position strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


def prompt_positions(example: EncodedExample, synthesis: PositionSynthesis,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Position ids [len(example.prompt)] of the prompt; responses continue after the last one."""
    length = len(example.prompt)
    if synthesis.window is None or not example.context:
        return torch.arange(length)
    tail = len(example.tail) + max((len(r) for r in example.responses), default=0)
    synthesized = synthesize_positions(example.chunk_lengths(synthesis.chunk_tokens), window=synthesis.window,
                                       prefix=len(example.head), tail=tail, strategy=synthesis.strategy,
                                       continuous_ratio=synthesis.continuous_ratio, generator=generator)
    return torch.cat([synthesized.context, synthesized.tail(len(example.tail))])


def collate(examples: Sequence[EncodedExample], *, pad_token_id: int, synthesis: PositionSynthesis = PositionSynthesis(),
            generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None) -> PackedBatch:
    """One packed row per example (module doc). Positions are drawn from ``generator``, or from
    ``generator[i]`` for example i when a sequence is given (positions then do not depend on batching)."""
    prompts = [torch.tensor(e.prompt, dtype=torch.long) for e in examples]
    responses = [[torch.tensor(r, dtype=torch.long) for r in e.responses] for e in examples]
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(examples)
    if len(generators) != len(examples):
        raise ValueError(f"{len(generators)} generators for {len(examples)} examples")
    positions = [prompt_positions(e, synthesis, g) for e, g in zip(examples, generators)]
    return pack_rows(prompts, responses, prefix_positions=positions, pad_token_id=pad_token_id)

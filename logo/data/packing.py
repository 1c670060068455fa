"""Shared-prefix packing: one row ``[prefix | response_0 | ... | response_M]`` per example.

The long prefix (system + context + question) is encoded once for all M + 1 responses instead of M + 1
times. Each response's position ids continue from the end of the prefix (all responses start at the same
position: they are alternatives). The token after a position is predicted by that position's hidden
state; in a packed row the first token of *every* response is predicted by the last prefix position,
the others by the previous token of the same response. ``score_index`` records that predictor for each
scored token, so no label shifting across response boundaries can go wrong.

Attention must let a response see the prefix and itself only: see :mod:`logo.attention`, which reads the
``layouts`` of a :class:`PackedBatch`. Rows are right-padded to a common length; padding never sits
inside a row and is neither attended to nor scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass(frozen=True)
class RowLayout:
    """Segments of one packed row: the prefix, then each response, then padding up to the row length."""

    prefix_length: int
    response_lengths: tuple


@dataclass
class PackedBatch:
    """Packed rows for a causal LM and the scored tokens for :func:`logo_kernels.logo_loss`.

    input_ids, position_ids [R, L]; layouts: one RowLayout per row; score_index [T] flat indices into
    the [R * L] hidden states of the position predicting each scored token; targets [T];
    cu_seqlens [R * (M + 1) + 1]: scored tokens grouped per example as [chosen, rejected_1..M].
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layouts: List[RowLayout]
    score_index: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_negatives(self) -> int:
        return len(self.layouts[0].response_lengths) - 1

    def to(self, device) -> "PackedBatch":
        """The same batch with its tensors on ``device``."""
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.layouts,
                           self.score_index.to(device), self.targets.to(device), self.cu_seqlens.to(device))


def pack_rows(prefixes: Sequence[torch.Tensor], responses: Sequence[Sequence[torch.Tensor]], *,
              prefix_positions: Optional[Sequence[torch.Tensor]] = None, pad_token_id: int = 0) -> PackedBatch:
    """Packs examples (a prefix and its M + 1 responses, chosen first) into rows.

    prefixes[b] [P_b] and responses[b][j] [n_bj] are 1-D token ids; prefix_positions[b] [P_b] are the
    prefix's position ids (e.g. from :func:`logo.data.synthesize_positions`; default 0..P_b-1) and must be
    strictly increasing. Every response needs >= 1 token; all examples need the same number of responses.
    """
    if len(prefixes) != len(responses) or not prefixes:
        raise ValueError(f"need one list of responses per prefix, got {len(prefixes)} prefixes and "
                         f"{len(responses)} response lists")
    groups = {len(r) for r in responses}
    if len(groups) != 1 or min(groups) < 2:
        raise ValueError(f"every example needs the same number (>= 2) of responses, got {sorted(groups)}")
    rows, positions, layouts, score_index, targets, seq_lengths = [], [], [], [], [], []
    for b, (prefix, answers) in enumerate(zip(prefixes, responses)):
        prefix = torch.as_tensor(prefix, dtype=torch.long)
        if prefix.dim() != 1 or prefix.numel() == 0:
            raise ValueError(f"example {b}: the prefix must be a non-empty 1-D tensor of token ids")
        pos = torch.arange(prefix.numel()) if prefix_positions is None else \
            torch.as_tensor(prefix_positions[b], dtype=torch.long)
        if pos.shape != prefix.shape or (pos[1:] <= pos[:-1]).any():
            raise ValueError(f"example {b}: prefix positions must match the prefix and be strictly increasing")
        row, row_pos, lengths = [prefix], [pos], []
        start = prefix.numel()
        for j, answer in enumerate(answers):
            answer = torch.as_tensor(answer, dtype=torch.long)
            if answer.dim() != 1 or answer.numel() == 0:
                raise ValueError(f"example {b}: response {j} must be a non-empty 1-D tensor of token ids")
            n = answer.numel()
            row.append(answer)
            row_pos.append(pos[-1] + 1 + torch.arange(n))
            # predictor of token k: the last prefix position for k = 0, else the previous response token
            predictors = torch.cat([torch.tensor([prefix.numel() - 1]), start + torch.arange(n - 1)])
            score_index.append((b, predictors))
            targets.append(answer)
            lengths.append(n)
            seq_lengths.append(n)
            start += n
        rows.append(torch.cat(row))
        positions.append(torch.cat(row_pos))
        layouts.append(RowLayout(prefix.numel(), tuple(lengths)))

    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, pos) in enumerate(zip(rows, positions)):
        input_ids[b, :row.numel()] = row
        position_ids[b, :row.numel()] = pos  # padding keeps position 0: it is never attended to nor scored
    flat_index = torch.cat([b * width + predictors for b, predictors in score_index])
    cu_seqlens = torch.zeros(len(seq_lengths) + 1, dtype=torch.long)
    cu_seqlens[1:] = torch.tensor(seq_lengths).cumsum(0)
    return PackedBatch(input_ids, position_ids, layouts, flat_index, torch.cat(targets), cu_seqlens)

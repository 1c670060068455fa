"""LOGO's multi-negative preference loss straight from hidden states of response tokens.

Per example b (one chosen y_w, M rejected y_l^j; l = mean token log-prob over a response's scored tokens):
    z_b = beta * (l_w - mean_j l_l^j) - gamma
    loss_b = -log s(z_b)   (label smoothing eps: -(1-eps) log s(z) - eps log s(-z); hinge: relu(1 - z))
    sft_b = -l_w
    loss = mean_b (loss_b + sft_weight * sft_b)
M = 1 is exactly SimPO. The per-token log-probs come from the fused op (no [T, V] logits); the
per-sequence means are segment sums over ``cu_seqlens`` (no Python loop over sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .._validation import check_filter_eps
from ..linear_logprobs import linear_logprobs
from .preference import check_hyperparameters, preference_loss

LOGO_LOSS_TYPES = {"sigmoid": "logo", "hinge": "hinge"}


@dataclass
class LogoLossOutput:
    """loss (scalar, differentiable); everything else detached.

    chosen_logps [B] and rejected_logps [B, M] are length-normalised mean log-probs; chosen_rewards [B]
    and rejected_rewards [B, M] are beta times them; margins [B] = chosen_rewards - mean rejected_rewards;
    accuracy = fraction of (example, rejected) pairs ranked correctly; sft_loss = mean of -chosen_logps;
    aux_loss: a term a caller added to ``loss`` (e.g. an MoE router's load-balancing loss), else None.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor
    sft_loss: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None


def _response_name(k: int) -> str:
    return "chosen" if k == 0 else f"rejected_{k}"


def check_sequences(cu_seqlens: torch.Tensor, num_tokens: int, num_negatives: int) -> int:
    """Validates ``cu_seqlens`` for T tokens grouped [chosen, rejected_1..M] per example; returns B."""
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()
            or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool):
        raise TypeError("cu_seqlens must be a 1-D integer tensor [S + 1]")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold S + 1 >= 2 entries, got {bounds[:4]}...")
    if bounds[-1] != num_tokens:
        raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} must equal the number of tokens T = {num_tokens}")
    group = num_negatives + 1
    for s in range(len(bounds) - 1):
        if bounds[s + 1] < bounds[s]:
            raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{s}] = {bounds[s]} > "
                             f"cu_seqlens[{s + 1}] = {bounds[s + 1]} (example {s // group})")
    num_sequences = len(bounds) - 1
    if num_sequences % group:
        raise ValueError(f"{num_sequences} sequences cannot be grouped as [chosen, rejected_1..{num_negatives}] "
                         f"per example: S must be divisible by num_negatives + 1 = {group}")
    return num_sequences // group


def sequence_mean_logps(logp: torch.Tensor, scored: torch.Tensor, cu_seqlens: torch.Tensor,
                        num_negatives: int) -> torch.Tensor:
    """Mean log-prob of each sequence over its scored tokens -> [B, M + 1]; raises on empty responses."""
    num_sequences = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(logp.device)
    seq_id = torch.repeat_interleave(torch.arange(num_sequences, device=logp.device), lengths,
                                     output_size=logp.shape[0])
    counts = torch.zeros(num_sequences, dtype=logp.dtype, device=logp.device).index_add_(0, seq_id, scored.to(logp.dtype))
    sums = torch.zeros(num_sequences, dtype=logp.dtype, device=logp.device).index_add(0, seq_id, logp)
    return means_from_sums(sums, counts, num_negatives)


def means_from_sums(sums: torch.Tensor, counts: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Per-sequence log-prob sums [S] / scored-token counts [S] -> means [B, M + 1]; a sequence without a scored
    token is a ValueError naming its example and response (sequence parallelism all-reduces both first)."""
    empty = (counts == 0).nonzero()
    if empty.numel():
        s = int(empty[0, 0])
        group = num_negatives + 1
        raise ValueError(f"example {s // group}: response {_response_name(s % group)} (sequence {s}) has no "
                         f"scored tokens (all targets are ignore_index or it is empty)")
    return (sums / counts).view(-1, num_negatives + 1)


def logo_loss_from_means(means: torch.Tensor, *, beta: float, gamma: float, sft_weight: float,
                         loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> LogoLossOutput:
    """The LOGO loss (module doc) from the mean response log-probs [B, M + 1] ([:, 0] chosen); differentiable."""
    chosen, rejected = means[:, 0], means[:, 1:]
    out = preference_loss(chosen, rejected, loss_type=LOGO_LOSS_TYPES[loss_type], beta=beta, gamma=gamma,
                          label_smoothing=label_smoothing, sft_weight=sft_weight)
    return LogoLossOutput(
        loss=out.loss,
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        margins=out.margins,
        accuracy=out.accuracy,
        sft_loss=out.sft_loss,
    )


def logo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_negatives: int = 2,
    beta: float = 10.0,
    gamma: float = 3.0,
    sft_weight: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
    filter_eps: Union[None, float, str] = None,
) -> LogoLossOutput:
    """LOGO loss from the hidden states of response tokens (formula in the module doc).

    Args:
        hidden: [T, D] hidden states of the response tokens of all sequences, concatenated
            (``hidden[t]`` predicts ``targets[t]``).
        weight: [V, D] LM head (``bias`` [V] optional).
        targets: [T] next-token ids; ``ignore_index`` tokens are not scored.
        cu_seqlens: [S + 1] int sequence boundaries in hidden/targets, S = B * (M + 1), grouped per
            example as [chosen, rejected_1..rejected_M].
        num_negatives: M. beta, gamma: reward scale and target margin. sft_weight: λ of the SFT term.
        loss_type: "sigmoid" or "hinge". label_smoothing: ε (sigmoid only).
        temperature, softcap, logit_scale, backend, deterministic, filter_eps: passed to
            :func:`logo_kernels.linear_logprobs` (``filter_eps``: gradient filtering, docs/filtering.md).
    """
    if loss_type not in LOGO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOGO_LOSS_TYPES)}, got {loss_type!r}")
    check_hyperparameters(LOGO_LOSS_TYPES[loss_type], beta, gamma, label_smoothing, sft_weight)
    if not isinstance(hidden, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("hidden and targets must be torch.Tensors")
    if hidden.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"hidden must be [T, D] and targets [T], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    check_sequences(cu_seqlens, targets.shape[0], num_negatives)
    logp = linear_logprobs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                           softcap=softcap, logit_scale=logit_scale, backend=backend, deterministic=deterministic,
                           filter_eps=filter_eps)
    means = sequence_mean_logps(logp, targets != ignore_index, cu_seqlens, num_negatives)
    return logo_loss_from_means(means, beta=beta, gamma=gamma, sft_weight=sft_weight, loss_type=loss_type,
                                label_smoothing=label_smoothing)


class LogoLoss(nn.Module):
    """:func:`logo_loss` with its hyper-parameters fixed at construction.

    ``forward(hidden, weight, targets, cu_seqlens, bias=None) -> LogoLossOutput``. For a Hugging Face
    causal LM, :func:`logo_kernels.integrations.hf.causal_lm_logo_loss` runs the backbone and calls it.
    """

    def __init__(self, num_negatives: int = 2, beta: float = 10.0, gamma: float = 3.0, sft_weight: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, ignore_index: int = -100,
                 backend: str = "auto", filter_eps: Union[None, float, str] = None):
        super().__init__()
        check_filter_eps(filter_eps, torch.float32)
        if loss_type not in LOGO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(LOGO_LOSS_TYPES)}, got {loss_type!r}")
        check_hyperparameters(LOGO_LOSS_TYPES[loss_type], beta, gamma, label_smoothing, sft_weight)
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        self.num_negatives, self.beta, self.gamma, self.sft_weight = num_negatives, beta, gamma, sft_weight
        self.loss_type, self.label_smoothing, self.ignore_index, self.backend = (
            loss_type, label_smoothing, ignore_index, backend)
        self.filter_eps = filter_eps

    def forward(self, hidden, weight, targets, cu_seqlens, bias=None, *, temperature: float = 1.0,
                softcap: Optional[float] = None, logit_scale: float = 1.0) -> LogoLossOutput:
        return logo_loss(hidden, weight, targets, cu_seqlens, num_negatives=self.num_negatives, beta=self.beta,
                         gamma=self.gamma, sft_weight=self.sft_weight, loss_type=self.loss_type,
                         label_smoothing=self.label_smoothing, ignore_index=self.ignore_index, bias=bias,
                         temperature=temperature, softcap=softcap, logit_scale=logit_scale, backend=self.backend,
                         filter_eps=self.filter_eps)

    def from_means(self, means: torch.Tensor) -> LogoLossOutput:
        """:func:`logo_loss_from_means` with this loss's hyper-parameters (means [B, M + 1], chosen first)."""
        return logo_loss_from_means(means, beta=self.beta, gamma=self.gamma, sft_weight=self.sft_weight,
                                    loss_type=self.loss_type, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"num_negatives={self.num_negatives}, beta={self.beta}, gamma={self.gamma}, "
                f"sft_weight={self.sft_weight}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"
                + (f", filter_eps={self.filter_eps!r}" if self.filter_eps is not None else ""))

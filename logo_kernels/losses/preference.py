"""The preference-loss family on per-sequence log-probabilities (one chosen : M rejected).

All types share one quantity, the policy's (reference-adjusted) preference margin against the mean of the
M rejected responses, which is LOGO's multi-negative rule:

    h_b = (c_b - c_ref_b) - mean_j (r_bj - r_ref_bj)          (refs are 0 for reference-free types)
    z_b = beta * h_b - gamma

| loss_type        | loss_b                                                   | paper                          |
| ---------------- | -------------------------------------------------------- | ------------------------------ |
| logo, simpo      | -(1-eps) log s(z) - eps log s(-z), reference-free        | LOGO 2410.18533, SimPO 2405.14734 |
| dpo              | same, with reference log-probs (gamma usually 0; eps = cDPO) | DPO 2305.18290             |
| robust           | (-(1-eps) log s(z) + eps log s(-z)) / (1 - 2 eps)        | rDPO, Chowdhury et al. 2403.00409 |
| hinge            | relu(1 - z)                                              | SLiC-HF 2305.10425; SimPO code |
| ipo              | (h - 1 / (2 beta))^2                                     | IPO, Azar et al. 2310.12036    |
| cpo              | -(1-eps) log s(z) - eps log s(-z), reference-free (+ NLL via sft_weight, paper: 1) | CPO 2401.08417 |
| orpo             | -beta log s(log_odds(c) - mean_j log_odds(r_j)) (+ NLL via sft_weight, paper: 1) | ORPO 2403.07691 |

s = sigmoid, eps = label_smoothing, log_odds(l) = l - log(1 - exp(l)) on length-normalised log-probs.
Every type adds ``sft_weight * nll_b`` with nll_b = ``chosen_nll`` if given, else ``-chosen_logps``
(LOGO's λ·SFT term on the chosen response; CPO/ORPO's NLL term). The loss is the mean over examples.
Which log-probs to pass (summed or length-normalised) is the caller's choice and part of each method:
LOGO/SimPO/ORPO use means over tokens, DPO/IPO/CPO as published use sums.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("logo", "simpo", "dpo", "robust", "hinge", "ipo", "cpo", "orpo")
_REFERENCE_FREE = ("logo", "simpo", "cpo", "orpo")
_SIGMOID_FAMILY = ("logo", "simpo", "dpo", "cpo")


@dataclass
class PreferenceLossOutput:
    """``loss`` (scalar, differentiable) and detached per-example metrics.

    chosen_rewards [B] and rejected_rewards [B, M] are beta * (logps - ref_logps); margins [B] =
    chosen_rewards - mean_j rejected_rewards; accuracy = fraction of (example, rejected) pairs whose
    chosen reward is higher; sft_loss = mean NLL of the chosen responses.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor
    sft_loss: torch.Tensor


def _as_2d(name: str, rejected: torch.Tensor, batch: int) -> torch.Tensor:
    if rejected.dim() == 1:
        rejected = rejected.unsqueeze(1)
    if rejected.dim() != 2 or rejected.shape[0] != batch or rejected.shape[1] == 0:
        raise ValueError(f"{name} must be [B] or [B, M] with B = {batch}, M >= 1; got {tuple(rejected.shape)}")
    return rejected


#: Per-sequence log-probs are <= 0; this much above 0 is still accepted as rounding.
LOGP_SLACK = 1e-4


def _real(name: str, value, *, low: float = None, low_open: bool = False) -> float:
    """A finite real number (not a bool), optionally bounded below; the message names the argument."""
    bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            low is not None and (value <= low if low_open else value < low)):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_hyperparameters(loss_type: str, beta, gamma, label_smoothing, sft_weight) -> None:
    """Types, finiteness and ranges of the family's hyper-parameters (shared by logo_loss and LogoLoss)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    _real("beta", beta, low=0.0, low_open=True)
    _real("gamma", gamma)
    _real("sft_weight", sft_weight, low=0.0)
    _real("label_smoothing", label_smoothing, low=0.0)
    limit = 0.5 if loss_type == "robust" else 1.0
    if not label_smoothing < limit:
        raise ValueError(f"label_smoothing must be in [0, {limit}) for loss_type={loss_type!r}, got {label_smoothing}")
    if label_smoothing and loss_type in ("hinge", "ipo", "orpo"):
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    if gamma and loss_type in ("ipo", "orpo"):
        raise ValueError(f"gamma (a margin) is not defined for loss_type={loss_type!r}")


def check_logps(name: str, value, *, dims: tuple) -> None:
    """A floating tensor of per-sequence log-probs: finite and <= 0 (a positive value is logits or rewards)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor of log-probabilities, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(f'{d}-d' for d in dims)} shape, got {tuple(value.shape)}")
    if value.numel() == 0 or value.device.type == "meta":
        return
    detached = value.detach()
    bad = ~torch.isfinite(detached)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}{list(index)} = {detached[index].item()}: log-probabilities must be finite")
    positive = detached > LOGP_SLACK
    if bool(positive.any()):
        index = tuple(int(i) for i in positive.nonzero()[0])
        raise ValueError(f"{name}{list(index)} = {detached[index].item():.4g} > 0: log-probabilities are <= 0 "
                         "(logits or rewards passed by mistake?)")


def _check_args(loss_type, beta, gamma, label_smoothing, sft_weight, chosen_logps, rejected_logps, ref_chosen,
                ref_rejected, chosen_nll):
    check_hyperparameters(loss_type, beta, gamma, label_smoothing, sft_weight)
    has_ref = ref_chosen is not None or ref_rejected is not None
    if has_ref and (ref_chosen is None or ref_rejected is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if loss_type in _REFERENCE_FREE and has_ref:
        raise ValueError(f"loss_type={loss_type!r} is reference-free: drop the reference log-probs")
    if loss_type == "dpo" and not has_ref:
        raise ValueError("loss_type='dpo' needs ref_chosen_logps and ref_rejected_logps")
    check_logps("chosen_logps", chosen_logps, dims=(1,))
    check_logps("rejected_logps", rejected_logps, dims=(1, 2))
    if has_ref:
        check_logps("ref_chosen_logps", ref_chosen, dims=(1,))
        check_logps("ref_rejected_logps", ref_rejected, dims=(1, 2))
    if chosen_nll is not None:
        if not isinstance(chosen_nll, torch.Tensor) or not chosen_nll.is_floating_point():
            raise TypeError("chosen_nll must be a floating torch.Tensor")
        if not bool(torch.isfinite(chosen_nll.detach()).all()) or bool((chosen_nll.detach() < -LOGP_SLACK).any()):
            raise ValueError("chosen_nll must be finite and >= 0 (a negative log-likelihood)")


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean log-prob) < 1 (ORPO), stable near p -> 1."""
    mean_logps = mean_logps.clamp(max=-1e-6)
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    loss_type: str = "logo",
    beta: float = 10.0,
    gamma: float = 0.0,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll: Optional[torch.Tensor] = None,
) -> PreferenceLossOutput:
    """Preference loss of one chosen vs M rejected responses per example (formulas in the module doc).

    chosen_logps [B], rejected_logps [B] or [B, M] (and the reference ones, same shapes) are per-sequence
    log-probs, differentiable; computation is in fp32 (fp64 stays fp64). Log-probs must be finite and <= 0;
    beta > 0, gamma, sft_weight >= 0 and label_smoothing finite: anything else is a ValueError naming it.
    """
    _check_args(loss_type, beta, gamma, label_smoothing, sft_weight, chosen_logps, rejected_logps, ref_chosen_logps,
                ref_rejected_logps, chosen_nll)
    batch = chosen_logps.shape[0]
    rejected_logps = _as_2d("rejected_logps", rejected_logps, batch)
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    chosen = chosen_logps.to(dtype)
    rejected = rejected_logps.to(dtype)
    if ref_chosen_logps is not None:
        ref_rejected = _as_2d("ref_rejected_logps", ref_rejected_logps, batch)
        if ref_rejected.shape != rejected.shape or ref_chosen_logps.shape != chosen.shape:
            raise ValueError("reference log-probs must have the shapes of the policy log-probs")
        chosen_ratio = chosen - ref_chosen_logps.to(dtype)
        rejected_ratio = rejected - ref_rejected.to(dtype)
    else:
        chosen_ratio, rejected_ratio = chosen, rejected

    eps = label_smoothing
    if loss_type == "orpo":
        ratio = _log_odds(chosen) - _log_odds(rejected).mean(dim=1)
        losses = -beta * F.logsigmoid(ratio)
    else:
        h = chosen_ratio - rejected_ratio.mean(dim=1)
        z = beta * h - gamma
        if loss_type in _SIGMOID_FAMILY:
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            losses = torch.relu(1 - z)
        else:  # ipo
            losses = (h - 1 / (2 * beta)) ** 2

    nll = -chosen if chosen_nll is None else chosen_nll.to(dtype)
    total = losses + sft_weight * nll if sft_weight else losses
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    return PreferenceLossOutput(
        loss=total.mean(),
        losses=losses.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards.mean(dim=1),
        accuracy=(chosen_rewards[:, None] > rejected_rewards).to(dtype).mean(),
        sft_loss=nll.detach().mean(),
    )

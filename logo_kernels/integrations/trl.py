"""TRL on logo_kernels: every per-token log-prob TRL computes through its fused LM head runs on our op.

    from logo_kernels.integrations import trl as logo_trl
    logo_trl.enable()          # before or after building the trainer; DPO/GRPO/RLOO/KTO/SFT, policy and reference
    ...                        # trainer.train() as usual
    logo_trl.disable()         # TRL's own kernel again (or: with logo_trl.enabled(): ...)

TRL (1.16) routes the log-probs of DPOTrainer, GRPOTrainer, RLOOTrainer, KTOTrainer and SFTTrainer through
``trl.trainer.utils.add_fused_lm_head``: it patches a model so that ``model(..., labels=..., fused_lm_head=True)``
runs the backbone and then ``_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs)``, inside TRL's own ZeRO-3 gathering, after its
DTensor (FSDP2) ``full_tensor()`` and PEFT unwrapping, and with its shift / ``shift_labels`` / masking. ``enable()``
replaces only that kernel (the module attribute ``trl.trainer.utils._ChunkedLogProbFunction``) with
:class:`LogoChunkedLogProb`, which returns the same five per-token outputs (log-probs and entropy
differentiable, the other three not) computed by :func:`logo_kernels.linear_logprobs`: no [tokens, vocab] tile
lives beyond one backend block, and the backward re-gathers a ZeRO-3 head itself. It also makes TRL compact
the scored positions on every device (TRL does so only where Triton runs: elsewhere it scores padding and prompt
positions and masks them afterwards; the results are identical, the work is not).
Everything else — which positions are scored, the loss, the metrics — stays TRL's.

``enable`` checks the installed TRL against the versions this contract was tested with and refuses others
(``allow_untested=True`` tries anyway, with a warning).
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch

from .._validation import check_filter_eps
from ..linear_logprobs import linear_logprobs
from ._dropin import check_contract, enabled_block, restore_attributes

#: TRL versions whose ``add_fused_lm_head`` contract the tests run against (tests/test_trl_integration.py).
TESTED_TRL_VERSIONS = ("1.16.0",)
_KERNEL_PARAMETERS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                      "final_logit_softcapping", "logit_scale", "outputs")
_EXTRA = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

_saved: Optional[dict] = None


class LogoChunkedLogProb:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``: ``apply(...)`` -> (log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1), each [N] or None when not in ``outputs``; log_probs always."""

    backend = "auto"
    filter_eps = None  # gradient filtering of the op (docs/filtering.md); None: exact

    @classmethod
    def apply(cls, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: Optional[float] = None,
              logit_scale: float = 1.0, outputs: Tuple[str, ...] = _EXTRA):
        wanted = ("logp",) + tuple(name for name in _EXTRA if name in outputs)
        stats = linear_logprobs(hidden, weight, targets, bias, temperature=float(temperature),
                                softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
                                logit_scale=float(logit_scale), outputs=wanted, backend=cls.backend,
                                filter_eps=cls.filter_eps)
        return stats.logp, stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, stats.is_top1


def _compact_everywhere(device: torch.device) -> bool:
    return True


def _check_version(allow_untested: bool):
    try:
        import trl
        import trl.trainer.utils as trl_utils
    except ImportError as error:
        raise ImportError("logo_kernels.integrations.trl needs TRL: pip install 'logo-kernels[trl]' "
                          f"(tested: trl=={' / '.join(TESTED_TRL_VERSIONS)})") from error
    problems = []
    if trl.__version__ not in TESTED_TRL_VERSIONS:
        problems.append(f"TRL {trl.__version__} is not a tested version ({', '.join(TESTED_TRL_VERSIONS)})")
    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if kernel is None or not hasattr(trl_utils, "_use_triton") or not hasattr(trl_utils, "add_fused_lm_head"):
        problems.append("trl.trainer.utils has no _ChunkedLogProbFunction / _use_triton / add_fused_lm_head")
    elif kernel is not LogoChunkedLogProb and tuple(inspect.signature(kernel.forward).parameters) != _KERNEL_PARAMETERS:
        problems.append(f"TRL's kernel takes {tuple(inspect.signature(kernel.forward).parameters)}, not "
                        f"{_KERNEL_PARAMETERS}")
    check_contract("trl", "fused-LM-head", problems, allow_untested, f"trl=={TESTED_TRL_VERSIONS[-1]}")
    return trl_utils


def enable(*, backend: str = "auto", allow_untested: bool = False, filter_eps=None) -> None:
    """Routes TRL's fused LM head to :func:`logo_kernels.linear_logprobs` (module doc); idempotent. ``filter_eps``:
    the op's gradient filtering (None: exact; "auto" or a float, docs/filtering.md)."""
    global _saved
    check_filter_eps(filter_eps, torch.float32)
    trl_utils = _check_version(allow_untested)
    LogoChunkedLogProb.backend = backend
    LogoChunkedLogProb.filter_eps = filter_eps
    if _saved is None:
        _saved = {(trl_utils, "_ChunkedLogProbFunction"): trl_utils._ChunkedLogProbFunction,
                  (trl_utils, "_use_triton"): trl_utils._use_triton}
    trl_utils._ChunkedLogProbFunction = LogoChunkedLogProb
    trl_utils._use_triton = _compact_everywhere


def disable() -> None:
    """TRL's own kernel again; idempotent."""
    global _saved
    LogoChunkedLogProb.backend, LogoChunkedLogProb.filter_eps = "auto", None
    if _saved is None:
        return
    restore_attributes(_saved)
    _saved = None


def is_enabled() -> bool:
    return _saved is not None


def enabled(*, backend: str = "auto", allow_untested: bool = False, filter_eps=None):
    """``with enabled(): trainer.train()`` — TRL on our op inside the block only."""
    return enabled_block(enable, disable, is_enabled, backend=backend, allow_untested=allow_untested,
                         filter_eps=filter_eps)

"""logo_kernels: fused ops for long-context preference training.

``linear_logprobs`` computes per-token log-probabilities of target tokens straight from hidden states and
the LM-head weight (forward and backward) without materialising the [tokens x vocab] logits;
``logo_loss`` is LOGO's multi-negative preference loss on top of it, ``preference_loss`` the family
(SimPO, DPO, IPO, hinge, robust, CPO, ORPO) on per-sequence log-probs; ``integrations.hf`` runs a Hugging
Face causal LM's backbone and applies the fused loss without computing its logits.
"""
import torch  # noqa: F401  (libtorch must be loaded before the C++ extension)

from .backends import available_backends
from .linear_logprobs import TokenStats, linear_logprobs
from .losses import LogoLoss, LogoLossOutput, PreferenceLossOutput, logo_loss, preference_loss

from ._version import __version__
__all__ = ["linear_logprobs", "TokenStats", "logo_loss", "LogoLoss", "LogoLossOutput", "preference_loss", "PreferenceLossOutput",
           "available_backends", "__version__"]

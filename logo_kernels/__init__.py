"""logo_kernels: fused ops for long-context preference training.

``linear_logprobs`` computes per-token log-probabilities of target tokens straight from hidden states and
the LM-head weight (forward and backward) without materialising the [tokens x vocab] logits.
"""
import torch  # noqa: F401  (libtorch must be loaded before the C++ extension)

from .backends import available_backends
from .linear_logprobs import linear_logprobs

__version__ = "0.1.0"
__all__ = ["linear_logprobs", "available_backends", "__version__"]

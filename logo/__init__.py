"""logo: the LOGO method (Long cOntext aliGnment via efficient preference Optimization, arXiv 2410.18533).

``logo.data`` (preference records, tokenisation, positional indices synthesis, shared-prefix packing, the
data builder and the synthetic tasks), ``logo.attention`` / ``logo.objective`` (the shared-prefix attention
and the packed LOGO loss), and the training loop ``python -m logo.train``. The fused ops it stands on live
in ``logo_kernels``.
"""
from logo_kernels._version import __version__ as __version__  # one version for both packages

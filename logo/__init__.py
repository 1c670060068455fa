"""logo: the LOGO method (Long cOntext aliGnment via efficient preference Optimization, arXiv 2410.18533).

This package will hold the preference data format and builder, positional indices synthesis, shared-prefix
packing, model loading and the training loop (``python -m logo.train``). The fused ops it stands on live
in ``logo_kernels``.
"""
__version__ = "0.1.0"

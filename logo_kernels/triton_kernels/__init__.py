"""Triton kernels of the fused linear -> log-prob op (GPU; verified on CPU with ``TRITON_INTERPRET=1``).

One file per stage: ``tiles.py`` (the logits tile shared by every kernel), ``forward.py`` (online
log-sum-exp + target logit), ``backward.py`` (dHidden over token blocks, dWeight/dBias over vocabulary
blocks). Every program owns the output rows it writes, so results are deterministic (no atomics).
"""

"""Tile configurations of the Triton kernels, in one place.

``GPU_CONFIGS[(kernel, dtype)]`` lists the candidate tiles for sm_80 (A100/A800) and sm_90 (H100/H200):
``BLOCK_N`` tokens x ``BLOCK_V`` vocabulary rows x ``BLOCK_D`` features per tile, warps and pipeline stages.
The first entry of each list is the default; with ``LOGO_KERNELS_AUTOTUNE=1`` on a GPU, ``triton.autotune``
times every entry once per (N bucket, V, D) and keeps the fastest. All of them are compile-checked for
sm_80 / sm_90 here without a GPU (``tests/triton_compile_check.py``: shared memory within the per-block limit).
fp32 tiles are half the size of the half-precision ones (exact fp32 products use 2x the registers/shared
memory of bf16 tensor-core operands).
Under the interpreter the cost grows with programs x loop iterations, so tests use the largest blocks the
shape allows (:func:`interpreter_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3
    group_n: int = 8  # grouped program order of the fused backward (token blocks per vocabulary sweep)

    def as_dict(self) -> Dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d}


_HALF = {
    "forward": [TileConfig(64, 128, 64, 4, 3), TileConfig(128, 128, 64, 8, 3), TileConfig(64, 256, 64, 8, 3),
                TileConfig(128, 64, 64, 4, 4)],
    "grad_hidden": [TileConfig(64, 128, 64, 4, 3), TileConfig(128, 64, 64, 4, 3), TileConfig(64, 64, 64, 4, 4)],
    "grad_weight": [TileConfig(64, 128, 64, 4, 3), TileConfig(64, 64, 64, 4, 4), TileConfig(128, 128, 32, 8, 3)],
    "grad_fused": [TileConfig(64, 128, 64, 4, 3, 8), TileConfig(128, 128, 64, 8, 3, 8),
                   TileConfig(64, 64, 64, 4, 4, 16)],
}
_FP32 = {
    "forward": [TileConfig(32, 64, 32, 4, 3), TileConfig(64, 64, 32, 4, 3)],
    "grad_hidden": [TileConfig(32, 64, 32, 4, 3), TileConfig(64, 32, 32, 4, 3)],
    "grad_weight": [TileConfig(32, 64, 32, 4, 3), TileConfig(64, 32, 32, 4, 3)],
    "grad_fused": [TileConfig(32, 64, 32, 4, 3, 8), TileConfig(64, 64, 32, 4, 2, 8)],
}
KERNELS = ("forward", "grad_hidden", "grad_weight", "grad_fused")
DTYPES = ("bf16", "fp16", "fp32")
GPU_CONFIGS: Dict[Tuple[str, str], List[TileConfig]] = {
    (kernel, dtype): (_FP32 if dtype == "fp32" else _HALF)[kernel] for kernel in KERNELS for dtype in DTYPES
}


def default_config(kernel: str, dtype: str) -> TileConfig:
    return GPU_CONFIGS[(kernel, dtype)][0]


def _pow2(x: int, low: int, high: int) -> int:
    p = 1 << max(0, (int(x) - 1).bit_length())
    return max(low, min(high, p))


#: Largest vocabulary block under the interpreter (tests lower it to exercise multi-tile schedules, e.g. the skipped
#: tiles of gradient filtering, on small shapes).
INTERPRETER_MAX_BLOCK_V = 1024


def interpreter_blocks(n: int, vocab: int, dim: int) -> TileConfig:
    """The largest blocks the shape allows (powers of two >= 16, as tl.dot requires)."""
    return TileConfig(_pow2(n, 16, 128), _pow2(vocab, 16, INTERPRETER_MAX_BLOCK_V), _pow2(dim, 16, 128), group_n=4)


def shrink_to_shape(config: TileConfig, n: int, vocab: int, dim: int) -> TileConfig:
    """Blocks no larger than the (power-of-two rounded) shape, so tiny inputs do not run mostly-masked tiles."""
    return TileConfig(min(config.block_n, _pow2(n, 16, config.block_n)),
                      min(config.block_v, _pow2(vocab, 16, config.block_v)),
                      min(config.block_d, _pow2(dim, 16, config.block_d)), config.num_warps, config.num_stages,
                      config.group_n)

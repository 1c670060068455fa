"""Compiles the Triton kernels for real GPUs (sm_80, sm_90) without one; prints a JSON line per kernel.

Run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones). Block sizes are
the GPU defaults of logo_kernels.backends.triton.choose_blocks.
"""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from logo_kernels.triton_kernels.backward import grad_hidden_kernel, grad_weight_kernel  # noqa: E402
from logo_kernels.triton_kernels.forward import forward_kernel  # noqa: E402

POINTERS = {"h_ptr": "*{dtype}", "w_ptr": "*{dtype}", "b_ptr": "*{dtype}", "t_ptr": "*i64"}
FLAGS = {forward_kernel: {}, grad_hidden_kernel: {"HAS_GLSE": True},
         grad_weight_kernel: {"HAS_GLSE": True, "NEED_DW": True, "NEED_DB": True}}


def compile_kernel(kernel, dtype: str, capability: int):
    constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, DOT_FP32=dtype == "fp32", BLOCK_N=64, BLOCK_V=128,
                      BLOCK_D=64, **FLAGS[kernel])
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name].format(dtype=dtype)
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in ("inv_temp", "softcap") else "i64"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


if __name__ == "__main__":
    for capability in (80, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for kernel in FLAGS:
                compiled = compile_kernel(kernel, dtype, capability)
                print(json.dumps({"sm": capability, "dtype": dtype, "kernel": kernel.fn.__name__,
                                  "shared_bytes": compiled.metadata.shared, "ptx": "ptx" in compiled.asm}))
    sys.exit(0)

"""Compiles the Triton kernels for real GPUs (sm_80, sm_90) without one; prints a JSON line per kernel and tile
configuration of :mod:`logo_kernels.triton_kernels.configs`: the default tile of each (kernel, dtype), or with
``--all`` every candidate autotune may pick.

Run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from logo_kernels.triton_kernels.backward import grad_fused_kernel, grad_hidden_kernel, grad_weight_kernel  # noqa: E402
from logo_kernels.triton_kernels.configs import GPU_CONFIGS  # noqa: E402
from logo_kernels.triton_kernels.forward import forward_kernel  # noqa: E402

KERNELS = {"forward": forward_kernel, "grad_hidden": grad_hidden_kernel, "grad_weight": grad_weight_kernel,
           "grad_fused": grad_fused_kernel}
POINTERS = {"h_ptr": "*{dtype}", "w_ptr": "*{dtype}", "b_ptr": "*{dtype}", "t_ptr": "*i64", "top1_ptr": "*i8",
            "order_ptr": "*i64", "live_ptr": "*i8"}
FLAGS = {"forward": dict(WANT_ENTROPY=True, WANT_LSQ=True, WANT_MEAN=True, WANT_TOP1=True),
         "grad_hidden": dict(HAS_GLSE=True, HAS_ENT=True),
         "grad_weight": dict(HAS_GLSE=True, HAS_ENT=True, NEED_DW=True, NEED_DB=True),
         "grad_fused": dict(HAS_GLSE=True, HAS_ENT=True, NEED_DH=True, NEED_DW=True, NEED_DB=True)}
FLOATS = ("logit_scale", "inv_temp", "softcap")


def compile_kernel(name: str, dtype: str, capability: int, config, filtering: bool = False):
    kernel = KERNELS[name]
    constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, DOT_FP32=dtype == "fp32", FILTER=filtering, **config.as_dict(),
                      **FLAGS[name])
    if name == "grad_fused":
        constexprs["GROUP_N"] = config.group_n
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in POINTERS:
            signature[arg] = POINTERS[arg].format(dtype=dtype)
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i64"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_row(job) -> str:
    capability, name, dtype, index, config, filtering = job
    compiled = compile_kernel(name, dtype, capability, config, filtering)
    return json.dumps({"sm": capability, "dtype": dtype, "kernel": name, "config": index, "filter": filtering,
                       "tile": [config.block_n, config.block_v, config.block_d],
                       "shared_bytes": compiled.metadata.shared, "ptx": "ptx" in compiled.asm,
                       "cubin": "cubin" in compiled.asm})


if __name__ == "__main__":
    from concurrent.futures import ProcessPoolExecutor

    # every default tile with and without gradient filtering (FILTER); with --all every candidate, filtering on
    jobs = [(capability, name, dtype, index, config, filtering) for capability in (80, 90)
            for (name, dtype), configs in GPU_CONFIGS.items()
            for index, config in enumerate(configs if "--all" in sys.argv else configs[:1])
            for filtering in ((True,) if "--all" in sys.argv else (False, True))]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:  # compiles are independent
        for row in pool.map(compile_row, jobs):
            print(row, flush=True)
    sys.exit(0)

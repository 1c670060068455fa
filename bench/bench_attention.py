"""Shared-prefix attention of one layer, fwd + bwd: the exact path vs FlexAttention (``logo.attention``).

One packed row ``[prefix | 3 responses of 512 tokens]``, Llama-3-8B's attention shape (32 query heads over 8
key/value heads of 128), bf16 on CUDA; with ``--softcap`` Gemma 2's attention softcap, with ``--window`` a sliding
window. Writes CSV + PNG (``harness``); on CPU (no FlexAttention backward) only the exact path runs.

    python bench/bench_attention.py --gpu            # CUDA, prefixes 32K and 64K (make gpu-check)
    python bench/bench_attention.py --quick          # CPU, prefix 2K, 4 heads (wiring)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = ["exact", "flex"]


def build_step(method, prefix, response, responses, heads, kv_heads, head_dim, device, dtype, softcap, window):
    import torch

    import logo.attention as attention
    from logo.attention.features import AttentionFeatures
    from logo.data.packing import RowLayout

    g = torch.Generator().manual_seed(0)
    length = prefix + responses * response
    make = lambda h: torch.randn(1, h, length, head_dim, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = (make(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    upstream = make(heads)
    layouts = [RowLayout(prefix, (response,) * responses)]
    features = AttentionFeatures(scale=head_dim ** -0.5, window=window, softcap=softcap)
    attention.settings.backend = method

    def step():
        q.grad = k.grad = v.grad = None
        out = attention.packed_attention(q, k, v, layouts, features)
        (out * upstream).sum().backward()
    return step


def measure(case: dict) -> dict:
    import torch
    torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    step = build_step(case["method"], case["prefix"], case["response"], case["responses"], case["heads"],
                      case["kv_heads"], case["head_dim"], case["device"], dtype, case["softcap"], case["window"])
    timer = harness.time_runs_cuda if case["device"] == "cuda" else harness.time_runs
    return timer(step, repeats=case["repeats"], warmup=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--responses", type=int, default=3)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, prefixes 32K / 64K, both paths")
    parser.add_argument("--quick", action="store_true", help="CPU, prefix 2K, 4 / 2 heads of 64, exact path")
    harness.add_run_arguments(parser, "attention")
    args = parser.parse_args(argv)
    dtype, methods = "bfloat16", METHODS
    if args.gpu:
        args.device = "cuda"
    else:
        dtype, methods = "float32", ["exact"]
    if args.quick:
        args.prefixes, args.heads, args.kv_heads, args.head_dim = [2048], 4, 2, 64
    cases = [dict(method=m, prefix=p, response=args.response, responses=args.responses, heads=args.heads,
                  kv_heads=args.kv_heads, head_dim=args.head_dim, device=args.device, dtype=dtype,
                  softcap=args.softcap, window=args.window, threads=args.threads, repeats=args.repeats)
             for p in args.prefixes for m in methods]
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                             rounds=args.rounds)
    harness.add_relative(rows, ("prefix", "softcap", "window"), baseline="exact")
    harness.save_results(rows, args.out, x="prefix", panel_keys=("softcap", "window"), series_order=METHODS,
                         title=f"shared-prefix attention fwd+bwd, {dtype}")


if __name__ == "__main__":
    harness.script_main(main, measure)

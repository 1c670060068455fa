"""Per-token log-probs from hidden states, fwd + bwd with a random per-token upstream gradient.

Methods (one process per method and round; per shape, ``--rounds`` rounds over the methods so that drift
hits them alike; median of the pooled timed runs, each after a warm-up in its process):
  naive        log_softmax(hidden @ W.T).gather(targets)         (materialises [N, V] logits)
  torch_lce    torch 2.13 F.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
  ours_torch   logo_kernels.linear_logprobs(backend="torch")     (chunked torch reference)
  ours_cpp     logo_kernels.linear_logprobs(backend="cpp")       (C++ / OpenMP kernels)
  ours_triton  logo_kernels.linear_logprobs(backend="triton")    (CUDA device only: --gpu; deterministic backward,
               the logits recomputed twice: 10·N·V·D FLOPs)
  ours_triton_fast  the same with deterministic=False (one recomputation, atomics: 8·N·V·D FLOPs)
  ours_cpp_filter, ours_triton_filter, ours_triton_fast_filter
               the same with gradient filtering (``--filter-eps``, default "auto": 2^-12 at bf16; give a float for
               fp32, whose "auto" is 2^-28)
  cce          cut_cross_entropy.linear_cross_entropy (its Triton kernel on GPUs, impl="torch_compile" on CPU)
  liger        Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none") (Triton: GPU only)
  trl          trl.kernels.ChunkedLogProbFunction                 (its torch path on CPU)
Inputs (``--inputs``): ``gaussian`` (random, the default: no structure) or ``lm_like`` (bench/lm_like.py: logits with
the sparsity of a language model, targets drawn from its softmax) — the distribution gradient filtering feeds on.
A plain GEMM [N, D] x [D, V] is timed in the same run to report the GEMM efficiency of each method
(8·N·V·D FLOPs for fwd + bwd with recomputation); on GPUs the achieved TFLOP/s are also reported counted as
6·N·V·D (the work of the materialised baseline), so methods compare on useful work.

    python bench/bench_linear_logprobs.py                 # full sweep (long)
    python bench/bench_linear_logprobs.py --quick         # N in {1024, 4096}, V = 32000, both heads
    python bench/bench_linear_logprobs.py --ns 4096 --vocabs 32000 --methods naive ours_cpp
    python bench/bench_linear_logprobs.py --gpu    # CUDA, bf16, D = 4096, V = 128256, N in {4K, 16K, 64K}
    python bench/bench_linear_logprobs.py --ns 4096 --vocabs 128256 --inputs lm_like gaussian --filter-eps 2.44140625e-4 \
        --methods naive ours_cpp ours_cpp_filter cce --out bench/results/filter_fp32   # issue 23's comparison
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = ["naive", "torch_lce", "ours_torch", "ours_cpp", "ours_cpp_filter", "ours_triton", "ours_triton_filter",
           "ours_triton_fast", "ours_triton_fast_filter", "cce", "liger", "trl"]
GPU_METHODS = ["naive", "torch_lce", "ours_triton", "ours_triton_fast", "cce", "liger"]
#: ``--gpu-filter``: gradient filtering at bf16 "auto" on LM-like inputs against the unfiltered kernels and CCE (whose
#: own filter is on by default at bf16).
GPU_FILTER_METHODS = ["ours_triton", "ours_triton_filter", "ours_triton_fast", "ours_triton_fast_filter", "cce"]
INPUTS = ("gaussian", "lm_like")
FULL_NS = [1024, 2048, 4096, 8192, 16384]
FULL_VOCABS = [32000, 128256]
# fp32 [N, V] buffers a method holds at its peak (rough, for skipping cases that cannot fit).
_LOGITS_COPIES = {"naive": 4, "torch_lce": 0.5, "cce": 2, "trl": 0.5, "liger": 0.5}


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_filter_eps(value: str):
    """``--filter-eps``: "auto" or a float."""
    return value if value == "auto" else float(value)


def build_inputs(inputs: str, n: int, vocab: int, dim: int, seed: int = 0, device: str = "cpu"):
    """(hidden [n, dim], weight [vocab, dim], targets [n]) fp32 on ``device``: Gaussian, or LM-like
    (bench/lm_like.py; built on the CPU, its targets drawn on ``device``)."""
    import torch

    if inputs == "lm_like":
        import lm_like
        hidden, weight = (x.to(device) for x in lm_like.lm_like(n, vocab, dim, seed))
        return hidden, weight, lm_like.sample_targets(hidden, weight, seed)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g).mul_(dim**-0.5)
    return hidden, weight, torch.randint(0, vocab, (n,), generator=g)


def build_step(method: str, n: int, vocab: int, dim: int, head: str = "trainable", seed: int = 0,
               device: str = "cpu", dtype: str = "fp32", inputs: str = "gaussian", filter_eps="auto"):
    """Returns a zero-argument fwd+bwd step for ``method`` on fixed inputs (``inputs``: module doc).

    ``head="frozen"`` leaves the weight without gradient (the LoRA case): only dHidden is computed."""
    import torch

    cast = dict(device=device, dtype=getattr(torch, DTYPES[dtype]))
    hidden, weight, targets = build_inputs(inputs, n, vocab, dim, seed, device)
    hidden = hidden.to(**cast).requires_grad_()
    weight = weight.to(**cast).requires_grad_(head == "trainable")
    targets = targets.to(device)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(device)

    if method == "naive":
        def logp():
            return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    elif method == "torch_lce":
        import torch.nn.functional as F
        options = torch.nn.LinearCrossEntropyOptions()

        def logp():
            return -F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=options)
    elif method.startswith("ours_"):
        import logo_kernels as lk
        variant = method[len("ours_"):]
        backend = variant.replace("_fast", "").replace("_filter", "")
        deterministic = "_fast" not in variant
        eps = filter_eps if variant.endswith("_filter") else None

        def logp():
            return lk.linear_logprobs(hidden, weight, targets, backend=backend, deterministic=deterministic,
                                      filter_eps=eps)
    elif method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def logp():
            return -liger(weight, hidden, targets)
    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def logp():
            impl = "cce" if device == "cuda" else "torch_compile"  # its Triton kernel on GPUs
            return -linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
    elif method == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def logp():
            return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ())[0]
    elif method == "gemm":
        w_t = weight.detach().T

        def step():
            torch.mm(hidden.detach(), w_t)
        return step
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        hidden.grad = weight.grad = None
        (logp() * upstream).sum().backward()
    return step


def measure(case: dict) -> dict:
    import torch
    torch.set_num_threads(case["threads"])
    device = case.get("device", "cpu")
    step = build_step(case["method"], case["n"], case["vocab"], case["dim"], case.get("head", "trainable"),
                      device=device, dtype=case.get("dtype", "fp32"), inputs=case.get("inputs", "gaussian"),
                      filter_eps=parse_filter_eps(case.get("filter_eps", "auto")))
    timer = harness.time_runs_cuda if device == "cuda" else harness.time_runs
    return timer(step, repeats=case["repeats"], warmup=1)


def skip_reason(method: str, n: int, vocab: int, device: str = "cpu", dtype: str = "fp32") -> str | None:
    import torch
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if method.startswith("ours_triton") and device != "cuda" and not interpreting:
        return ("no CUDA device (the triton backend is benchmarked on GPUs only)" if not torch.cuda.is_available()
                else "the triton backend runs with --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if method.startswith("ours_cpp") and device == "cuda":
        return "the cpp backend runs on CPU tensors"
    if method == "liger" and device != "cuda":
        return "Liger's fused linear cross-entropy is Triton-only (no CPU path)"
    if method in ("cce", "trl", "liger"):
        import importlib.util
        module = {"cce": "cut_cross_entropy", "trl": "trl", "liger": "liger_kernel"}[method]
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    need = _LOGITS_COPIES.get(method, 0) * n * vocab * 4
    return harness.memory_skip_reason(need, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=None, help=f"token counts (default {FULL_NS}; with "
                        "--gpu 4096 16384 65536)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=FULL_VOCABS)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--heads", nargs="+", default=["trainable"], choices=["trainable", "frozen"],
                        help="LM head trainable (dW computed) and/or frozen (LoRA: only dHidden)")
    parser.add_argument("--quick", action="store_true", help="N in {1024, 4096}, V = 32000, both heads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--inputs", nargs="+", default=["gaussian"], choices=INPUTS,
                        help="input distributions (module doc)")
    parser.add_argument("--filter-eps", default="auto", type=str,
                        help="filter_eps of the *_filter methods: auto or a float (default auto)")
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA, bf16, D = 4096, V = 128256, N in {4096, 16384, 65536}: " + ", ".join(GPU_METHODS))
    parser.add_argument("--gpu-filter", action="store_true",
                        help="CUDA, bf16, D = 4096, V = 128256, N = 16384, LM-like inputs: " + ", ".join(GPU_FILTER_METHODS))
    parser.add_argument("--from-csv", action="store_true",
                        help="measure nothing: recompute ratios, CSV and plot from PREFIX.csv")
    harness.add_run_arguments(parser, "linear_logprobs")
    args = parser.parse_args(argv)
    chosen_ns, args.ns = args.ns, args.ns or FULL_NS
    if args.quick:
        args.ns, args.vocabs, args.heads = [1024, 4096], [32000], ["trainable", "frozen"]
    if args.gpu:
        args.device, args.dtype, args.dim, args.vocabs = "cuda", "bf16", 4096, [128256]
        args.ns, args.methods = chosen_ns or [4096, 16384, 65536], GPU_METHODS
    if args.gpu_filter:
        args.device, args.dtype, args.dim, args.vocabs, args.inputs = "cuda", "bf16", 4096, [128256], ["lm_like"]
        args.ns, args.methods = chosen_ns or [16384], GPU_FILTER_METHODS

    parse_filter_eps(args.filter_eps)  # a bad value fails here, not in every case
    cases = []
    for inputs, head, vocab, n in itertools.product(args.inputs, args.heads, args.vocabs, args.ns):
        # Methods interleaved per shape (timing noise here is ~30% between runs far apart).
        for method in ["gemm"] + args.methods:
            case = dict(method=method, head=head, n=n, vocab=vocab, dim=args.dim, threads=args.threads,
                        repeats=args.repeats, device=args.device, dtype=args.dtype, inputs=inputs,
                        filter_eps=args.filter_eps)
            reason = skip_reason(method, n, vocab, args.device, args.dtype)
            if reason:
                case["skip"] = reason
            cases.append(case)
    if args.from_csv:
        finish([_numeric(r) for r in harness.read_csv(args.out + ".csv")], args.out)
        return
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                              rounds=args.rounds)
    finish(rows, args.out)


def add_ratios(rows: list[dict]) -> None:
    """Adds time / memory relative to naive to each measured row, for our methods the GEMM efficiency — their GEMM
    work (:func:`gemm_count` GEMMs of 2·N·V·D FLOPs) / time, over a plain GEMM's FLOP/s measured in the same group
    of rounds — and on GPUs the achieved TFLOP/s counted as 6·N·V·D."""
    shape = lambda r: (r["head"], r["n"], r["vocab"], r["dim"], r.get("inputs", "gaussian"))  # noqa: E731
    harness.add_relative(rows, ("head", "n", "vocab", "dim", "inputs"))
    gemm = {shape(r): r for r in rows if r["method"] == "gemm" and not r.get("error")}
    for r in rows:
        if r.get("error"):
            continue
        plain = 2 * r["n"] * r["vocab"] * r["dim"]
        if r["method"] == "gemm":
            r["gflops"] = round(plain / r["median_s"] / 1e9, 1)
            continue
        base = gemm.get(shape(r))
        if r.get("device") == "cuda":
            r["tflops_6nvd"] = round(3 * plain / r["median_s"] / 1e12, 1)
        if r["method"].startswith("ours_") and not r["method"].endswith("_filter") and base:
            flops = plain * gemm_count(r["method"], r["head"])
            r["gflops"] = round(flops / r["median_s"] / 1e9, 1)
            r["gemm_efficiency"] = round(r["gflops"] / (plain / base["median_s"] / 1e9), 3)


def gemm_count(method: str, head: str) -> int:
    """N·V·D GEMMs of 2 FLOPs/element in one fwd + bwd: the forward's logits, then per backend the recomputation(s)
    and the gradient products (a frozen head: the forward's gradient basis instead of a backward)."""
    if method == "ours_triton":  # deterministic: dH and dW kernels each recompute the logits
        return 5 if head == "trainable" else 3
    if method == "ours_triton_fast":  # one recomputation feeding both products
        return 4 if head == "trainable" else 3
    return 4 if head == "trainable" else 2


def _numeric(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if key in ("n", "vocab", "dim", "threads", "repeats", "rounds", "runs"):
            out[key] = int(value) if value else value
        elif key in ("median_s", "min_s", "max_s", "peak_extra_mib"):
            out[key] = float(value) if value else value
        elif key not in ("gflops", "gemm_efficiency", "time_vs_naive", "memory_vs_naive", "tflops_6nvd"):
            out[key] = value
    return out


def finish(rows: list[dict], prefix: str) -> None:
    add_ratios(rows)
    dtype = next((r.get("dtype") for r in rows if r.get("dtype")), "fp32")
    harness.save_results(rows, prefix, x="n", panel_keys=("head", "vocab", "inputs"), series_order=METHODS,
                         title=f"fwd+bwd, {dtype}")


if __name__ == "__main__":
    harness.script_main(main, measure)

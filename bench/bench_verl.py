"""verl's fused log-prob + entropy kernels vs logo_kernels (run in verl's environment: ``make bench-verl``).

One step = what verl's actor update asks of its fused kernel (GRPO / PPO with an entropy bonus): forward of the
per-token log-probs and entropy from N x D hidden states and a trainable V x D head, then backward with an upstream
gradient on both outputs. Kernels:

  verl_torch   verl.utils.experimental.torch_functional.FusedLinearForPPO (its "torch" backend: 512-token chunks,
               each with its [chunk, V] logits)
  liger        Liger's LigerFusedLinearScaledCrossEntropyFunction, as verl's "liger" backend calls it (on CPU its
               pure-torch fallback, chunked over tokens like verl's)
  verl_triton  verl.utils.kernel.linear_cross_entropy (its "triton" backend; CUDA only: --gpu)
  ours         logo_kernels.integrations.verl.LogoFusedLinearForPPO (the drop-in enable() installs)

CPU: fp32, one process per kernel and round (interleaved rounds), median time and peak RSS over the process
baseline; --gpu: bf16 on CUDA, peak torch.cuda.max_memory_allocated.

    python bench/bench_verl.py                                  # N 4096 / 16384 x V 32000 / 128256, D 1024
    python bench/bench_verl.py --ns 4096 --vocabs 32000 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

KERNELS = ("verl_torch", "liger", "verl_triton", "ours")


def _kernel(name: str):
    """(hidden, weight, ids, temperature) -> (log_probs, entropy), as verl's model forward calls it."""
    if name == "verl_torch":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        module = FusedLinearForPPO(impl_backend="torch")
        return lambda h, w, ids, t: module.forward(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=t)
    if name == "liger":
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction

        def liger(h, w, ids, t):
            nll, entropy = LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, ids, t, -100, 1, True)
            return -nll, entropy
        return liger
    if name == "verl_triton":
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        return lambda h, w, ids, t: linear_cross_entropy(h, w, ids, float(t), "none")
    from logo_kernels.integrations.verl import LogoFusedLinearForPPO

    module = LogoFusedLinearForPPO()
    return lambda h, w, ids, t: module.forward(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=t)


def measure(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    device = "cuda" if case["gpu"] else "cpu"
    dtype = torch.bfloat16 if case["gpu"] else torch.float32
    n, dim, vocab = case["n"], case["dim"], case["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * dim ** -0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, vocab, (n,), generator=g).to(device)
    g_logp, g_entropy = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    kernel = _kernel(case["kernel"])

    def step():
        hidden.grad = weight.grad = None
        log_probs, entropy = kernel(hidden, weight, ids, 1.0)
        ((log_probs.float() * g_logp).sum() + (entropy.float() * g_entropy).sum()).backward()

    timer = harness.time_runs_cuda if case["gpu"] else harness.time_runs
    return timer(step, repeats=case["repeats"], warmup=1)


def add_ratios(rows: list) -> None:
    """time / memory of each row relative to verl's torch kernel at the same shape."""
    base = {(r["n"], r["vocab"]): r for r in rows if r["kernel"] == "verl_torch" and not r.get("error")}
    for r in rows:
        b = base.get((r["n"], r["vocab"]))
        if b is not None and not r.get("error"):
            r["time_vs_verl"] = round(float(r["median_s"]) / float(b["median_s"]), 3)
            r["memory_vs_verl"] = round(float(r["peak_extra_mib"]) / max(float(b["peak_extra_mib"]), 1e-9), 3)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return
    shapes = sorted({(int(r["n"]), int(r["vocab"])) for r in ok})
    fig, axes = plt.subplots(2, len(shapes), figsize=(3.6 * len(shapes), 6.5), squeeze=False)
    colors = {"verl_torch": "tab:gray", "liger": "tab:orange", "verl_triton": "tab:green", "ours": "tab:blue"}
    for col, (n, vocab) in enumerate(shapes):
        members = [r for r in ok if int(r["n"]) == n and int(r["vocab"]) == vocab]
        names = [r["kernel"] for r in members]
        axes[0][col].bar(names, [float(r["median_s"]) for r in members], color=[colors[k] for k in names])
        axes[1][col].bar(names, [float(r["peak_extra_mib"]) for r in members], color=[colors[k] for k in names])
        axes[0][col].set_title(f"N {n}, V {vocab}: seconds", fontsize=9)
        axes[1][col].set_title("peak extra memory, MiB", fontsize=9)
        for ax in axes[:, col]:
            ax.tick_params(axis="x", labelsize=8, rotation=20)
            ax.grid(True, axis="y", alpha=0.3)
    harness.save_figure(fig, path)
    plt.close(fig)


def finish(rows: list, prefix: str) -> None:
    add_ratios(rows)
    harness.write_csv(rows, prefix + ".csv")
    plot(rows, prefix + ".png")
    print(f"wrote {prefix}.csv and {prefix}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[4096, 16384], help="tokens")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--gpu", action="store_true", help="bf16 on CUDA (adds verl's Triton kernel)")
    parser.add_argument("--from-csv", action="store_true", help="measure nothing: ratios and plot from PREFIX.csv")
    harness.add_run_arguments(parser, "verl")
    args = parser.parse_args(argv)
    if args.from_csv:
        finish(harness.read_csv(args.out + ".csv"), args.out)
        return
    import importlib.util

    cases = []
    for n in args.ns:
        for vocab in args.vocabs:
            for kernel in args.kernels:
                case = dict(kernel=kernel, n=n, vocab=vocab, dim=args.dim, gpu=args.gpu, threads=args.threads,
                            repeats=args.repeats)
                if kernel != "ours" and importlib.util.find_spec("verl") is None:
                    case["skip"] = "verl not installed (make verl-env)"
                elif kernel == "liger" and importlib.util.find_spec("liger_kernel") is None:
                    case["skip"] = "liger-kernel not installed"
                elif kernel == "verl_triton" and not args.gpu:
                    case["skip"] = "verl's Triton kernel needs CUDA (--gpu)"
                cases.append(case)
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                             rounds=args.rounds, series="kernel")
    finish(rows, args.out)


if __name__ == "__main__":
    harness.script_main(main, measure)

"""LOGO loss (one chosen : M rejected, SFT term) from hidden states of T response tokens, fwd + bwd.

Methods (fp32, D = ``--dim``; one process per method and round, ``--rounds`` rounds over the methods of a
shape, median of the pooled timed runs, each after a warm-up in its process):
  naive        what the authors' code does: full [T, V] logits, upcast, log_softmax, gather, per-sequence
               means, the LOGO formula (bugs L1-L3 fixed)
  ours         logo_kernels.logo_loss (fused log-probs: no [T, V] tensor)
  ours_fast    the same with deterministic=False (the Triton backward with one recomputation; GPU only)
  liger_simpo  Liger-Kernel's chunked LigerFusedLinearSimPOLoss (1 : 1 only, so M = 1 cases only)
Responses are 512 tokens (fewer if T is small): B = max(1, T / (512 * (M + 1))) examples.

    python bench/bench_loss.py --quick      # T in {1024, 4096}, V = 32000, M in {1, 2}
    python bench/bench_loss.py              # T in 1K..32K, V in {32000, 128256}, M in {1, 2, 3}
    python bench/bench_loss.py --gpu        # CUDA, bf16, D = 4096, V = 128256, T in {4K, 16K, 32K}, M in {1, 2}
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = ["naive", "ours", "ours_fast", "liger_simpo"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BETA, GAMMA, SFT_WEIGHT = 10.0, 3.0, 0.1


def layout(tokens: int, negatives: int, response: int = 512):
    """(examples B, tokens per response) for about ``tokens`` response tokens in all."""
    per_example = tokens // (negatives + 1)
    batch = max(1, per_example // response)
    return batch, max(1, per_example // batch)


def build_step(method: str, tokens: int, vocab: int, dim: int, negatives: int, head: str = "trainable",
               seed: int = 0, device: str = "cpu", dtype: str = "fp32"):
    """fwd + bwd of one loss computation; ``head="frozen"`` (LoRA) leaves the LM head without gradient."""
    import torch
    import torch.nn.functional as F

    batch, length = layout(tokens, negatives)
    sequences = batch * (negatives + 1)
    g = torch.Generator().manual_seed(seed)
    cast = dict(device=device, dtype=getattr(torch, DTYPES[dtype]))
    hidden = torch.randn(sequences * length, dim, generator=g).to(**cast).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).mul_(dim**-0.5).to(**cast).requires_grad_(head == "trainable")
    targets = torch.randint(0, vocab, (sequences * length,), generator=g).to(device)
    cu_seqlens = (torch.arange(0, sequences + 1) * length).to(device)

    if method in ("ours", "ours_fast"):
        import logo_kernels as lk

        def loss():
            return lk.logo_loss(hidden, weight, targets, cu_seqlens, num_negatives=negatives, beta=BETA,
                                gamma=GAMMA, sft_weight=SFT_WEIGHT, deterministic=method == "ours").loss
    elif method == "naive":
        def loss():
            logits = (hidden @ weight.T).float()
            token_logps = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
            means = token_logps.view(sequences, length).mean(1).view(batch, negatives + 1)
            z = BETA * (means[:, 0] - means[:, 1:].mean(1)) - GAMMA
            return (-F.logsigmoid(z) - SFT_WEIGHT * means[:, 0]).mean()
    elif method == "liger_simpo":
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
        # Liger wants [2B, L, D] with all chosen rows first; the row order does not change the cost.
        module = LigerFusedLinearSimPOLoss(beta=BETA, gamma=GAMMA, alpha=SFT_WEIGHT)  # gamma: absolute margin
        inputs, labels = hidden.view(sequences, length, dim), targets.view(sequences, length)

        def loss():
            out = module(weight, inputs, labels)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        hidden.grad = weight.grad = None
        loss().backward()
    return step


def measure(case: dict) -> dict:
    import torch
    torch.set_num_threads(case["threads"])
    device = case.get("device", "cpu")
    step = build_step(case["method"], case["tokens"], case["vocab"], case["dim"], case["negatives"],
                      case.get("head", "trainable"), device=device, dtype=case.get("dtype", "fp32"))
    timer = harness.time_runs_cuda if device == "cuda" else harness.time_runs
    return timer(step, repeats=case["repeats"], warmup=1)


def skip_reason(method: str, tokens: int, vocab: int, negatives: int, device: str = "cpu") -> str | None:
    import importlib.util

    import torch
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if method == "ours_fast" and device != "cuda":
        return "deterministic=False only changes the Triton backward (GPU)"
    if method == "liger_simpo":
        if negatives != 1:
            return "Liger's SimPO is 1 : 1 (M = 1 only)"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel not installed"
    copies = {"naive": 4, "liger_simpo": 1}.get(method, 0)
    return harness.memory_skip_reason(copies * tokens * vocab * 4, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", nargs="+", default=["trainable", "frozen"], choices=["trainable", "frozen"],
                        help="LM head trainable and/or frozen (LoRA, LOGO's recipe)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="T in {1024, 4096}, V = 32000, M in {1, 2}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA, bf16, D = 4096, V = 128256, T in {4096, 16384, 32768}, M in {1, 2}")
    harness.add_run_arguments(parser, "loss")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocabs, args.negatives = [1024, 4096], [32000], [1, 2]
    if args.gpu:
        args.device, args.dtype, args.dim, args.vocabs = "cuda", "bf16", 4096, [128256]
        args.tokens, args.negatives = [4096, 16384, 32768], [1, 2]

    cases = []
    for head in args.heads:
        for vocab in args.vocabs:
            for negatives in args.negatives:
                for tokens in args.tokens:
                    for method in args.methods:  # interleaved per shape: timing noise drifts over minutes
                        case = dict(method=method, head=head, tokens=tokens, vocab=vocab, negatives=negatives,
                                    dim=args.dim, threads=args.threads, repeats=args.repeats, device=args.device,
                                    dtype=args.dtype)
                        reason = skip_reason(method, tokens, vocab, negatives, args.device)
                        if reason:
                            case["skip"] = reason
                        cases.append(case)
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                              rounds=args.rounds)
    harness.add_relative(rows, ("head", "tokens", "vocab", "negatives", "dim"))
    harness.save_results(rows, args.out, x="tokens", panel_keys=("head", "vocab", "negatives"),
                         series_order=METHODS, title=f"LOGO loss fwd+bwd, {args.dtype}")


if __name__ == "__main__":
    harness.script_main(main, measure)

"""One LOGO training step (forward + backward) of a small Llama: the authors' path vs ours.

Methods (fp32, full fine-tuning, a Llama built from a config; one process per method and round,
``--rounds`` rounds over the methods of a shape, median of the pooled timed runs after a warm-up):
  authors   what the release does: M + 1 separate full sequences [context | response_j] in one batch,
            full [M+1, L, V] logits upcast to fp32, log_softmax, gather, per-sequence means, the LOGO loss
            (+ lambda SFT; bugs L1-L3 fixed)
  ours      one shared-prefix packed row [context | response_0 | ... | response_M] (logo.data.packing +
            the logo_shared_prefix attention) and the fused LOGO loss on the response tokens only
  previous_attention  (not in the default sweep) ``ours`` with the shared-prefix attention of commit 897ba98, the
            last before the attention became exact on every family: one SDPA call per segment over keys and values
            expanded to the query heads and concatenated per response. Read from the git history; the yardstick
            for "the full-attention step is not slower than before":
            --methods ours previous_attention --contexts 8192 --negatives 2 --vocabs 32000 --rounds 3
Each example: a context of C tokens (question included) and M + 1 responses of R tokens.

    python bench/bench_step.py --quick    # C in {1024, 8192}, M = 2, V = 32000
    python bench/bench_step.py            # C in 1K..16K, M in {1, 2, 3}, V in {32000, 128256}
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = ["authors", "ours"]
EXTRA_METHODS = ["previous_attention"]
PREVIOUS_ATTENTION_COMMIT = "897ba98"
BETA, GAMMA, SFT_WEIGHT = 10.0, 3.0, 0.1


# --family: the attention a step runs (the decoder's sizes stay the bench's): Gemma 2's softcap 50 with alternating
# 4096-token sliding layers, Mistral's 4096-token window — both shorter than the long contexts measured
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4096, attn_logit_softcapping=50.0,
                                                                 final_logit_softcapping=30.0, head_dim=64,
                                                                 query_pre_attn_scalar=64)),
            "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096))}


@functools.lru_cache(maxsize=None)
def previous_attention():
    """The ``shared_prefix_attention`` function of logo/attention.py at PREVIOUS_ATTENTION_COMMIT (git history);
    RuntimeError with git's message where it is not readable (no git, a shallow clone)."""
    import subprocess
    import types

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        shown = subprocess.run(["git", "-C", repo, "show", f"{PREVIOUS_ATTENTION_COMMIT}:logo/attention.py"],
                               capture_output=True, text=True)
    except OSError as error:
        raise RuntimeError(f"git: {error}") from None
    if shown.returncode:
        raise RuntimeError(shown.stderr.strip() or f"git show exited {shown.returncode}")
    source = shown.stdout
    module = types.ModuleType("logo_attention_" + PREVIOUS_ATTENTION_COMMIT)
    exec(compile(source, f"{PREVIOUS_ATTENTION_COMMIT}:logo/attention.py", "exec"), module.__dict__)
    return module.shared_prefix_attention


def tiny_llama(vocab: int, dim: int, layers: int, max_positions: int, intermediate: int = None,
               family: str = "llama"):
    import torch
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=dim, intermediate_size=intermediate or 4 * dim, num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 64), num_key_value_heads=max(1, dim // 256),
        max_position_embeddings=max_positions, tie_word_embeddings=False, **extra)
    return getattr(transformers, model_name)(config).train()


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_step(method: str, context: int, response: int, negatives: int, vocab: int, dim: int, layers: int,
               seed: int = 0, device: str = "cpu", dtype: str = "fp32", checkpointing: bool = False,
               intermediate: int = None, family: str = "llama"):
    """fwd + bwd of one example's LOGO step with ``method``; returns a callable."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (context,), generator=g).to(device)
    answers = [torch.randint(0, vocab, (response,), generator=g).to(device) for _ in range(negatives + 1)]
    model = tiny_llama(vocab, dim, layers, context + (negatives + 1) * response + 16, intermediate, family)
    model = model.to(device=device, dtype=getattr(torch, DTYPES[dtype]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if method == "authors":
        model.set_attn_implementation("sdpa" if family == "llama" else "eager")  # sdpa refuses softcap
        input_ids = torch.stack([torch.cat([prompt, a]) for a in answers])  # [M+1, C+R]
        labels = input_ids.clone()
        labels[:, :context] = -100

        def loss():
            logits = model(input_ids=input_ids).logits.float()                      # [M+1, L, V]
            logps = torch.log_softmax(logits[:, :-1], -1)
            target = labels[:, 1:]
            mask = target != -100
            token = logps.gather(2, target.clamp_min(0)[..., None]).squeeze(2) * mask
            means = token.sum(1) / mask.sum(1)                                         # [M+1]
            z = BETA * (means[0] - means[1:].mean()) - GAMMA
            return -F.logsigmoid(z) - SFT_WEIGHT * means[0]
    elif method in ("ours", "previous_attention"):
        import logo_kernels as lk
        from logo.data.packing import pack_rows
        from logo.attention import ATTENTION_NAME, enable_shared_prefix_attention
        from logo.objective import packed_logo_loss

        enable_shared_prefix_attention(model)
        if method == "previous_attention":
            from transformers import AttentionInterface

            AttentionInterface.register(ATTENTION_NAME, previous_attention())
        batch = pack_rows([prompt.cpu()], [[a.cpu() for a in answers]]).to(device)
        loss_fn = lk.LogoLoss(num_negatives=negatives, beta=BETA, gamma=GAMMA, sft_weight=SFT_WEIGHT)

        def loss():
            return packed_logo_loss(model, batch, loss_fn).loss
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()
    return step


def measure(case: dict) -> dict:
    import torch
    torch.set_num_threads(case["threads"])
    device = case.get("device", "cpu")
    step = build_step(case["method"], case["context"], case["response"], case["negatives"], case["vocab"],
                      case["dim"], case["layers"], device=device, dtype=case.get("dtype", "fp32"),
                      checkpointing=case.get("checkpointing", False), intermediate=case.get("intermediate"),
                      family=case.get("family", "llama"))
    timer = harness.time_runs_cuda if device == "cuda" else harness.time_runs
    return timer(step, repeats=case["repeats"], warmup=1)


def skip_reason(method: str, context: int, response: int, negatives: int, vocab: int, device: str = "cpu",
                dtype: str = "fp32", family: str = "llama") -> str | None:
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if method == "previous_attention":
        if family != "llama":
            return f"the previous attention dropped {family}'s attention features (wrong log-probs): llama only"
        try:
            previous_attention()
        except RuntimeError as error:  # no git, or a checkout without that history
            return f"the attention of commit {PREVIOUS_ATTENTION_COMMIT} is not readable from git here ({error})"
    tokens = (negatives + 1) * (context + response) if method == "authors" else 0
    width = 2 if dtype == "bf16" else 4
    need = tokens * vocab * (width + 4 + 4 + 4)  # logits, fp32 copy, log_softmax, its gradient
    return harness.memory_skip_reason(need, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--response", type=int, default=512, help="tokens per response")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + EXTRA_METHODS)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x dim)")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES),
                        help="the decoder's attention: llama (full), gemma2 (softcap + sliding), mistral-sliding")
    parser.add_argument("--quick", action="store_true", help="C in {1024, 8192}, M = 2, V = 32000")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the decoder layers")
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA, bf16, a 1B-scale Llama (D 2048, 16 layers, MLP 8192, V 128256) with gradient "
                             "checkpointing, 32K context, M = 2 x 512-token responses")
    harness.add_run_arguments(parser, "step")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.negatives, args.vocabs = [1024, 8192], [2], [32000]
    if args.gpu:
        args.device, args.dtype, args.checkpointing = "cuda", "bf16", True
        args.dim, args.layers, args.intermediate, args.vocabs = 2048, 16, 8192, [128256]
        args.contexts, args.negatives = [32768], [2]

    cases = []
    for vocab in args.vocabs:
        for negatives in args.negatives:
            for context in args.contexts:
                for method in args.methods:  # interleaved per shape: timing drifts over minutes here
                    case = dict(method=method, context=context, negatives=negatives, vocab=vocab,
                                response=args.response, dim=args.dim, layers=args.layers, threads=args.threads,
                                repeats=args.repeats, device=args.device, dtype=args.dtype,
                                checkpointing=args.checkpointing, intermediate=args.intermediate,
                                family=args.family)
                    reason = skip_reason(method, context, args.response, negatives, vocab, args.device, args.dtype,
                                         args.family)
                    if reason:
                        case["skip"] = reason
                    cases.append(case)
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                              rounds=args.rounds)
    shape_keys = ("context", "negatives", "vocab", "response", "dim", "layers")
    harness.add_relative(rows, shape_keys, baseline="authors")
    harness.add_relative(rows, shape_keys, baseline="previous_attention")
    harness.save_results(rows, args.out, x="context", panel_keys=("vocab", "negatives"), series_order=METHODS + EXTRA_METHODS,
                         title=f"LOGO training step fwd+bwd, {args.dtype}")


if __name__ == "__main__":
    harness.script_main(main, measure)

"""TRL on its own kernel vs on logo_kernels: the fused-LM-head op, a DPO training step and a GRPO loss step.

Parts (one process per case and round; ``--rounds`` rounds over the kernels of a part so that drift hits them
alike; median of the pooled timed runs, each after a warm-up in its process; peak RSS over the baseline):

  op    trl.kernels.ChunkedLogProbFunction vs logo_kernels (integrations.trl.LogoChunkedLogProb), fp32,
        N x D hidden, V x D trainable head, fwd + bwd with a per-token upstream gradient of the log-probs (and of
        the entropy for the ``+entropy`` variants: outputs ("log_probs", "entropy"), as GRPO asks)
  dpo   DPOTrainer.training_step on one batch (policy fwd + bwd and the reference model's fwd), a Llama of
        --hidden x --layers with a --vocab head, B pairs of --prompt + --completion tokens
  grpo  GRPOTrainer.compute_loss + backward on one batch of --generations completions (log-probs and entropy
        of the completion tokens, entropy bonus, high-entropy token mask), the same model

    python bench/bench_trl.py                # all parts at the default shapes
    python bench/bench_trl.py --parts op --rounds 5
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

KERNELS = {"op": ["trl", "trl+entropy", "ours", "ours+entropy"], "dpo": ["trl", "ours"], "grpo": ["trl", "ours"]}


def _op_step(case):
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from logo_kernels.integrations.trl import LogoChunkedLogProb

    n, dim, vocab = case["n"], case["dim"], case["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=g).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).mul_(dim ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    g_logp, g_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)
    kernel = ChunkedLogProbFunction if case["kernel"].startswith("trl") else LogoChunkedLogProb
    entropy = case["kernel"].endswith("+entropy")
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)

    def step():
        hidden.grad = weight.grad = None
        out = kernel.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)
        objective = (out[0] * g_logp).sum() + ((out[1] * g_entropy).sum() if entropy else 0)
        objective.backward()
    return step


def _model(case, tokenizer):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=max(case["vocab"], len(tokenizer)), hidden_size=case["hidden"],
                                      intermediate_size=2 * case["hidden"], num_hidden_layers=case["layers"],
                                      num_attention_heads=max(1, case["hidden"] // 64),
                                      num_key_value_heads=max(1, case["hidden"] // 128),
                                      max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def _words(count, seed):
    import random

    from logo.data.corpus import shipped_text

    words = shipped_text().split()
    rng = random.Random(seed)
    start = rng.randrange(len(words) - count)
    return " ".join(words[start:start + count])


def _trainer_step(case):
    import torch
    import datasets
    import trl

    from logo.data.tokenizer import default_tokenizer
    from logo_kernels.integrations import trl as logo_trl

    (logo_trl.enable if case["kernel"] == "ours" else logo_trl.disable)()
    tokenizer = default_tokenizer()
    common = dict(output_dir="/tmp/logo-bench-trl", report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                  disable_tqdm=True, max_steps=1, seed=0)
    if case["part"] == "dpo":
        rows = [{"prompt": _words(case["prompt"] // 2, i), "chosen": " " + _words(case["completion"] // 2, 100 + i),
                 "rejected": " " + _words(case["completion"] // 2, 200 + i)} for i in range(case["batch"])]
        args = trl.DPOConfig(**common, per_device_train_batch_size=case["batch"],
                             max_length=case["prompt"] + case["completion"], gradient_checkpointing=False)
        trainer = trl.DPOTrainer(model=_model(case, tokenizer), ref_model=_model(case, tokenizer), args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop

        def step():
            trainer.model.zero_grad(set_to_none=True)
            trainer.training_step(trainer.model, batch, None)
        return step

    args = trl.GRPOConfig(**common, per_device_train_batch_size=case["batch"], num_generations=case["batch"],
                          max_completion_length=case["completion"], entropy_coef=0.01, top_entropy_quantile=0.2,
                          beta=0.0, gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=_model(case, tokenizer), reward_funcs=lambda completions, **k: [0.0] * len(
        completions), args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "x"}] * case["batch"]),
        processing_class=tokenizer)
    g = torch.Generator().manual_seed(0)
    b, p, c = case["batch"], case["prompt"], case["completion"]
    inputs = {"prompt_ids": torch.randint(0, len(tokenizer), (b, p), generator=g),
              "prompt_mask": torch.ones(b, p, dtype=torch.long),
              "completion_ids": torch.randint(0, len(tokenizer), (b, c), generator=g),
              "completion_mask": torch.ones(b, c, dtype=torch.long), "advantages": torch.randn(b, generator=g),
              "num_items_in_batch": torch.tensor(b * c)}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop

    def step():
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, inputs).backward()
    return step


def measure(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    step = _op_step(case) if case["part"] == "op" else _trainer_step(case)
    return harness.time_runs(step, repeats=case["repeats"], warmup=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--n", type=int, default=4096, help="op: tokens")
    parser.add_argument("--dim", type=int, default=1024, help="op: hidden size D")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512, help="dpo/grpo: model hidden size")
    parser.add_argument("--layers", type=int, default=1, help="dpo/grpo: decoder layers")
    parser.add_argument("--batch", type=int, default=4, help="dpo: preference pairs; grpo: completions")
    parser.add_argument("--prompt", type=int, default=64, help="dpo/grpo: prompt tokens")
    parser.add_argument("--completion", type=int, default=448, help="dpo/grpo: completion tokens")
    parser.add_argument("--from-csv", action="store_true", help="measure nothing: ratios and plot from PREFIX.csv")
    harness.add_run_arguments(parser, "trl")
    args = parser.parse_args(argv)
    if args.from_csv:
        finish(harness.read_csv(args.out + ".csv"), args.out)
        return
    import importlib.util

    cases = []
    for part in args.parts:
        for kernel in KERNELS[part]:
            case = dict(part=part, kernel=kernel, threads=args.threads, repeats=args.repeats, vocab=args.vocab)
            case.update(dict(n=args.n, dim=args.dim) if part == "op" else dict(
                hidden=args.hidden, layers=args.layers, batch=args.batch, prompt=args.prompt,
                completion=args.completion))
            if importlib.util.find_spec("trl") is None:
                case["skip"] = "trl not installed"
            cases.append(case)
    rows = harness.run_cases(os.path.abspath(__file__), cases, args.out + ".csv", timeout_s=args.timeout,
                             rounds=args.rounds, series="kernel")
    finish(rows, args.out)


def add_ratios(rows: list) -> None:
    """time / memory of each row relative to TRL's kernel on the same part (and output set)."""
    by_part = {}
    for r in rows:
        if not r.get("error"):
            by_part.setdefault(r["part"], {})[r["kernel"]] = r
    for part, members in by_part.items():
        for name, r in members.items():
            base = members.get("trl+entropy" if name.endswith("+entropy") else "trl")
            if base is not None:
                r["time_vs_trl"] = round(float(r["median_s"]) / float(base["median_s"]), 3)
                r["memory_vs_trl"] = round(float(r["peak_extra_mib"]) / max(float(base["peak_extra_mib"]), 1e-9), 3)
        if "ours" in members and "ours+entropy" in members:
            members["ours+entropy"]["entropy_overhead"] = round(
                float(members["ours+entropy"]["median_s"]) / float(members["ours"]["median_s"]) - 1, 3)


def finish(rows: list, prefix: str) -> None:
    add_ratios(rows)
    harness.write_csv(rows, prefix + ".csv")
    plot(rows, prefix + ".png")
    print(f"wrote {prefix}.csv and {prefix}.png")


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return
    parts = [p for p in KERNELS if any(r["part"] == p for r in ok)]
    fig, axes = plt.subplots(2, len(parts), figsize=(4.5 * len(parts), 7), squeeze=False)
    for col, part in enumerate(parts):
        members = [r for r in ok if r["part"] == part]
        names = [r["kernel"] for r in members]
        colors = ["tab:gray" if n.startswith("trl") else "tab:blue" for n in names]
        axes[0][col].bar(names, [float(r["median_s"]) for r in members], color=colors)
        axes[1][col].bar(names, [float(r["peak_extra_mib"]) for r in members], color=colors)
        axes[0][col].set_title(f"{part}: seconds (median)", fontsize=9)
        axes[1][col].set_title(f"{part}: peak RSS over baseline, MiB", fontsize=9)
        for ax in axes[:, col]:
            ax.tick_params(axis="x", labelsize=8, rotation=20)
            ax.grid(True, axis="y", alpha=0.3)
    harness.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    harness.script_main(main, measure)

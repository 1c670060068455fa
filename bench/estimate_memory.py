"""The "Does it fit?" table: logo.estimate over the paper's settings, the authors' path vs ours.

Llama-3-8B, LoRA r 32 (q, k, v, o, embeddings), bf16, gradient checkpointing, DeepSpeed ZeRO-3 with
parameters and optimizer offloaded to CPU (the authors' setup), 8 GPUs, 512-token responses:
M in {2, 3, 4} x lambda in {0, 0.1} with 8K real tokens in a 64K window, then 64K and 80K real tokens.

    python bench/estimate_memory.py                 # writes results/estimate.csv, .png, prints a table
    python bench/estimate_memory.py --gpu H100-80GB --model mistral-7b
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from logo.estimate import GIB, GPUS, Setting, estimate, fits, model_shape  # noqa: E402

PATHS = {"authors": dict(loss="naive", packing="separate"), "ours": dict(loss="fused", packing="shared")}


def paper_settings():
    for negatives in (2, 3, 4):
        for sft_weight in (0.0, 0.1):
            yield Setting(real_tokens=8192, window=65536, negatives=negatives, sft_weight=sft_weight, offload="all")
    for real in (65536, 81920):
        yield Setting(real_tokens=real, window=max(65536, real), negatives=2, sft_weight=0.1, offload="all")


def rows_for(model: str, gpu: str):
    shape = model_shape(model)
    rows = []
    for setting in paper_settings():
        row = {"model": shape.name, "gpu": gpu, "real_tokens": setting.real_tokens, "window": setting.window,
               "negatives": setting.negatives, "sft_weight": setting.sft_weight}
        for name, path in PATHS.items():
            est = estimate(shape, replace(setting, **path))
            row[f"{name}_gib"] = round(est["total"] / GIB, 1)
            row[f"{name}_fits"] = fits(est["total"], gpu)
        rows.append(row)
    return rows


def markdown(rows) -> str:
    lines = ["| real tokens / window | M | λ | authors' path (GiB/GPU) | ours (GiB/GPU) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = lambda name: f"{r[name + '_gib']:.1f} {'fits' if r[name + '_fits'] else '**OOM**'}"  # noqa: E731
        lines.append(f"| {r['real_tokens'] // 1024}K / {r['window'] // 1024}K | {r['negatives']} | {r['sft_weight']} | "
                     f"{verdict('authors')} | {verdict('ours')} |")
    return "\n".join(lines)


def plot(rows, path: str, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['real_tokens'] // 1024}K M{r['negatives']} λ{r['sft_weight']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([x - 0.2 for x in xs], [r["authors_gib"] for r in rows], width=0.4, label="authors' path")
    ax.bar([x + 0.2 for x in xs], [r["ours_gib"] for r in rows], width=0.4, label="ours (shared prefix + fused)")
    ax.axhline(GPUS[gpu] / GIB, color="red", linestyle="--", label=gpu)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("estimated peak GiB per GPU")
    ax.set_title(f"{rows[0]['model']}, LoRA, ZeRO-3 + offload, 8 GPUs (logo.estimate)")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--gpu", default="A800-80GB", choices=sorted(GPUS))
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "estimate"))
    args = parser.parse_args(argv)
    rows = rows_for(args.model, args.gpu)
    harness.write_csv(rows, args.out + ".csv")
    plot(rows, args.out + ".png", args.gpu)
    print(markdown(rows))
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()

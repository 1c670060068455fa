"""Prints the README results tables (markdown) from bench/results/*.csv.

    python bench/readme_table.py op     # bench_linear_logprobs.py results (linear_logprobs*.csv)
    python bench/readme_table.py loss   # bench_loss.py results (loss*.csv)
    python bench/readme_table.py step   # bench_step.py results (step*.csv)
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

OP_LABELS = {"naive": "naive log_softmax + gather", "torch_lce": "torch 2.13 `F.linear_cross_entropy` (chunked)",
             "ours_torch": "**ours, torch backend**", "ours_cpp": "**ours, cpp backend**",
             "cce": "Cut-Cross-Entropy `torch_compile`", "trl": "TRL `ChunkedLogProbFunction`"}
STEP_LABELS = {"authors": "authors' path (M+1 sequences, full logits)", "ours": "**ours (shared prefix + fused)**"}
LOSS_LABELS = {"naive": "authors' path (full logits)", "ours": "**ours `logo_loss`**",
               "liger_simpo": "Liger `LigerFusedLinearSimPOLoss`"}


def _rows(pattern, labels):
    rows = []
    for path in sorted(glob.glob(os.path.join(harness.RESULTS_DIR, pattern))):
        rows += [r for r in harness.read_csv(path) if r["method"] in labels and not r.get("error")]
    return rows


def _head_order(r):
    return r.get("head", "trainable") != "trainable"


def _efficiency(row) -> str:
    return f"{float(row['gemm_efficiency']):.2f}" if row.get("gemm_efficiency") else "–"


def op_table() -> None:
    rows = _rows("linear_logprobs*.csv", OP_LABELS)
    print("| head | N | V | method | fwd+bwd s | × naive time | peak RSS MiB | × naive memory | GEMM eff. |")
    print("| --- | --: | --: | --- | --: | --: | --: | --: | --: |")
    key = lambda r: (_head_order(r), int(r["vocab"]), int(r["n"]), list(OP_LABELS).index(r["method"]))  # noqa: E731
    for r in sorted(rows, key=key):
        print(f"| {r.get('head', 'trainable')} | {r['n']} | {r['vocab']} | {OP_LABELS[r['method']]} | "
              f"{float(r['median_s']):.2f} | {float(r['time_vs_naive']):.2f} | {float(r['peak_extra_mib']):.0f} | "
              f"{float(r['memory_vs_naive']):.3f} | {_efficiency(r)} |")


def loss_table() -> None:
    rows = _rows("loss*.csv", LOSS_LABELS)
    print("| head | T | V | M | method | fwd+bwd s | × naive time | peak RSS MiB | × naive memory |")
    print("| --- | --: | --: | --: | --- | --: | --: | --: | --: |")
    key = lambda r: (_head_order(r), int(r["vocab"]), int(r["negatives"]), int(r["tokens"]),  # noqa: E731
                     list(LOSS_LABELS).index(r["method"]))
    for r in sorted(rows, key=key):
        print(f"| {r.get('head', 'trainable')} | {r['tokens']} | {r['vocab']} | {r['negatives']} | "
              f"{LOSS_LABELS[r['method']]} | {float(r['median_s']):.2f} | {float(r['time_vs_naive']):.2f} | "
              f"{float(r['peak_extra_mib']):.0f} | {float(r['memory_vs_naive']):.3f} |")


def step_table() -> None:
    rows = _rows("step*.csv", STEP_LABELS)
    print("| V | M | context | responses | method | step s | × authors time | peak RSS MiB | × authors memory |")
    print("| --: | --: | --: | --: | --- | --: | --: | --: | --: |")
    key = lambda r: (int(r["vocab"]), int(r["negatives"]), int(r["context"]),  # noqa: E731
                     list(STEP_LABELS).index(r["method"]))
    for r in sorted(rows, key=key):
        print(f"| {r['vocab']} | {r['negatives']} | {r['context']} | {int(r['negatives']) + 1}×{r['response']} | "
              f"{STEP_LABELS[r['method']]} | {float(r['median_s']):.2f} | {float(r['time_vs_authors']):.2f} | "
              f"{float(r['peak_extra_mib']):.0f} | {float(r['memory_vs_authors']):.3f} |")


if __name__ == "__main__":
    {"op": op_table, "loss": loss_table, "step": step_table}[sys.argv[1] if len(sys.argv) > 1 else "op"]()

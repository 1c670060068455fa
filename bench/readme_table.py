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


def _print_table(header: str, align: str, rows, key, cells) -> None:
    """A markdown table: ``header`` / ``align`` are the column names and alignments ("|"-separated), then
    one line per row sorted by ``key``, its cells given by ``cells(row)``."""
    print(f"| {header} |")
    print(f"| {align} |")
    for r in sorted(rows, key=key):
        print("| " + " | ".join(cells(r)) + " |")


def _timing_cells(r, baseline: str):
    return [f"{float(r['median_s']):.2f}", f"{float(r['time_vs_' + baseline]):.2f}",
            f"{float(r['peak_extra_mib']):.0f}", f"{float(r['memory_vs_' + baseline]):.3f}"]


def op_table() -> None:
    _print_table("head | N | V | method | fwd+bwd s | × naive time | peak RSS MiB | × naive memory | GEMM eff.",
                 "--- | --: | --: | --- | --: | --: | --: | --: | --:", _rows("linear_logprobs*.csv", OP_LABELS),
                 key=lambda r: (_head_order(r), int(r["vocab"]), int(r["n"]), list(OP_LABELS).index(r["method"])),
                 cells=lambda r: [r.get("head", "trainable"), r["n"], r["vocab"], OP_LABELS[r["method"]],
                                  *_timing_cells(r, "naive"), _efficiency(r)])


def loss_table() -> None:
    _print_table("head | T | V | M | method | fwd+bwd s | × naive time | peak RSS MiB | × naive memory",
                 "--- | --: | --: | --: | --- | --: | --: | --: | --:", _rows("loss*.csv", LOSS_LABELS),
                 key=lambda r: (_head_order(r), int(r["vocab"]), int(r["negatives"]), int(r["tokens"]),
                                list(LOSS_LABELS).index(r["method"])),
                 cells=lambda r: [r.get("head", "trainable"), r["tokens"], r["vocab"], r["negatives"],
                                  LOSS_LABELS[r["method"]], *_timing_cells(r, "naive")])


def step_table() -> None:
    _print_table("V | M | context | responses | method | step s | × authors time | peak RSS MiB | × authors memory",
                 "--: | --: | --: | --: | --- | --: | --: | --: | --:", _rows("step*.csv", STEP_LABELS),
                 key=lambda r: (int(r["vocab"]), int(r["negatives"]), int(r["context"]),
                                list(STEP_LABELS).index(r["method"])),
                 cells=lambda r: [r["vocab"], r["negatives"], r["context"],
                                  f"{int(r['negatives']) + 1}×{r['response']}", STEP_LABELS[r["method"]],
                                  *_timing_cells(r, "authors")])


if __name__ == "__main__":
    {"op": op_table, "loss": loss_table, "step": step_table}[sys.argv[1] if len(sys.argv) > 1 else "op"]()

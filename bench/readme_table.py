"""Prints the README results table (markdown) from bench/results/linear_logprobs*.csv."""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

LABELS = {"naive": "naive log_softmax + gather", "torch_lce": "torch 2.13 `F.linear_cross_entropy` (chunked)",
          "ours_torch": "**ours, torch backend**", "ours_cpp": "**ours, cpp backend**",
          "cce": "Cut-Cross-Entropy `torch_compile`", "trl": "TRL `ChunkedLogProbFunction`"}


def main() -> None:
    rows = []
    for path in sorted(glob.glob(os.path.join(harness.RESULTS_DIR, "linear_logprobs*.csv"))):
        rows += [r for r in harness.read_csv(path) if r["method"] in LABELS and not r.get("error")]
    print("| head | N | V | method | fwd+bwd s (median of 3) | × naive time | peak RSS MiB | × naive memory | GEMM eff. |")
    print("| --- | --: | --: | --- | --: | --: | --: | --: | --: |")
    key = lambda r: (r.get("head", "trainable") != "trainable", int(r["vocab"]), int(r["n"]),  # noqa: E731
                     list(LABELS).index(r["method"]))
    for r in sorted(rows, key=key):
        print(f"| {r.get('head', 'trainable')} | {r['n']} | {r['vocab']} | {LABELS[r['method']]} | {float(r['median_s']):.2f} | "
              f"{float(r['time_vs_naive']):.2f} | {float(r['peak_extra_mib']):.0f} | "
              f"{float(r['memory_vs_naive']):.3f} | {float(r['gemm_efficiency']):.2f} |")


if __name__ == "__main__":
    main()

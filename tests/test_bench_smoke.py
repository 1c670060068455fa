"""The bench scripts run end to end on a tiny case and write their CSV and PNG (timings not checked)."""
import csv
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

pytest.importorskip("matplotlib")


def run_bench(script, args, tmp_path):
    out = tmp_path / "result"
    subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert os.path.getsize(f"{out}.png") > 0
    return rows


def test_bench_linear_logprobs_smoke(tmp_path):
    rows = run_bench("bench_linear_logprobs.py", ["--ns", "16", "--vocabs", "50", "--dim", "8", "--methods", "naive",
                                                  "ours_torch", "ours_triton"], tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert float(by_method["ours_torch"]["median_s"]) > 0 and by_method["naive"]["time_vs_naive"] == "1.0"
    assert "no CUDA device" in by_method["ours_triton"]["error"] or by_method["ours_triton"]["median_s"]


def test_bench_loss_smoke(tmp_path):
    rows = run_bench("bench_loss.py", ["--tokens", "32", "--vocabs", "50", "--negatives", "2", "--dim", "8",
                                       "--methods", "naive", "ours"], tmp_path)
    assert {r["method"] for r in rows} == {"naive", "ours"}
    assert all(float(r["median_s"]) > 0 for r in rows)

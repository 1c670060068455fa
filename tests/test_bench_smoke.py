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
    triton = by_method["ours_triton"]  # interpreted when TRITON_INTERPRET=1 (as under pytest), else skipped
    assert "no CUDA device" in (triton.get("error") or "") or float(triton["median_s"]) > 0


def test_bench_loss_smoke(tmp_path):
    rows = run_bench("bench_loss.py", ["--tokens", "32", "--vocabs", "50", "--negatives", "2", "--dim", "8",
                                       "--methods", "naive", "ours"], tmp_path)
    assert {r["method"] for r in rows} == {"naive", "ours"}
    assert all(float(r["median_s"]) > 0 for r in rows)


def test_bench_step_smoke(tmp_path):
    pytest.importorskip("transformers")
    rows = run_bench("bench_step.py", ["--contexts", "32", "--negatives", "2", "--vocabs", "50", "--response", "8",
                                       "--dim", "64", "--layers", "1", "--rounds", "1"], tmp_path)
    assert {r["method"] for r in rows} == {"authors", "ours"} and all(float(r["median_s"]) > 0 for r in rows)


def test_bench_step_methods_compute_the_same_loss():
    pytest.importorskip("transformers")
    import inspect

    sys.path.insert(0, BENCH)
    import bench_step

    losses = []
    for method in ("authors", "ours"):
        step = bench_step.build_step(method, context=48, response=12, negatives=2, vocab=300, dim=64, layers=2)
        losses.append(float(inspect.getclosurevars(step).nonlocals["loss"]().detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the benchmark compares like with like


def test_bench_trl_smoke(tmp_path):
    pytest.importorskip("trl")
    rows = run_bench("bench_trl.py", ["--n", "32", "--dim", "8", "--vocab", "300", "--hidden", "64", "--batch", "2",
                                      "--prompt", "8", "--completion", "16", "--rounds", "1"], tmp_path)
    assert {(r["part"], r["kernel"]) for r in rows} == {("op", "trl"), ("op", "trl+entropy"), ("op", "ours"),
                                                        ("op", "ours+entropy"), ("dpo", "trl"), ("dpo", "ours"),
                                                        ("grpo", "trl"), ("grpo", "ours")}
    assert all(float(r["median_s"]) > 0 for r in rows) and all(r["time_vs_trl"] for r in rows)


def test_positions_coverage_script(tmp_path):
    out = tmp_path / "positions.csv"
    result = subprocess.run([sys.executable, os.path.join(BENCH, "positions_coverage.py"), "--draws", "20",
                             "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = {r["strategy"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"continuous", "sparse", "slots", "mixed"} and "bins hit" in result.stdout
    assert float(rows["continuous"]["mean_tail_start"]) > 0.9 * 65536


def test_gpu_check_runs_every_step_on_cpu_and_skips_missing_peers_with_a_reason(tmp_path):
    """make gpu-check's orchestration: the tests step, all three benchmarks (their CPU / interpreter variants),
    the summary; Liger (Triton-only) and absent peers are skipped with a reason."""
    out = tmp_path / "gpu"
    result = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke", "--repeats", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("summary.md", "environment.json", "tests.xml", "linear_logprobs.csv", "loss.csv", "step.csv"):
        assert (out / name).is_file(), name
    rows = {r["method"]: r for r in csv.DictReader(open(out / "linear_logprobs.csv"))}
    assert float(rows["ours_triton"]["median_s"]) > 0 and float(rows["ours_triton_fast"]["median_s"]) > 0
    assert "Triton-only" in rows["liger"]["error"]
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "## One LOGO step" in summary


def test_gpu_check_parses():
    result = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "make gpu-check" in result.stdout

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


def test_bench_step_methods_compute_the_same_loss():
    pytest.importorskip("transformers")
    import inspect

    sys.path.insert(0, BENCH)
    import bench_step

    from logo.attention import register_shared_prefix_attention

    methods = ["authors", "ours"]
    if bench_step.skip_reason("previous_attention", 48, 12, 2, 300) is None:  # the git history is here
        methods.append("previous_attention")
    losses = []
    try:
        for method in methods:
            step = bench_step.build_step(method, context=48, response=12, negatives=2, vocab=300, dim=64, layers=2)
            losses.append(float(inspect.getclosurevars(step).nonlocals["loss"]().detach()))
    finally:
        register_shared_prefix_attention()  # previous_attention replaced the registered function
    assert losses[1:] == pytest.approx(losses[:1] * (len(losses) - 1), rel=1e-5)  # like with like


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
    """make gpu-check's orchestration: the tests step, every benchmark (their CPU / interpreter variants), the
    summary; Liger (Triton-only) and absent peers are skipped with a reason. It is also the smoke test of
    bench_linear_logprobs.py, bench_loss.py, bench_step.py and bench_attention.py: each wrote its CSV (with the
    ratio columns) and PNG."""
    out = tmp_path / "gpu"
    result = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke", "--repeats", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("summary.md", "environment.json", "tests.xml", "linear_logprobs.csv", "loss.csv", "step.csv",
                 "attention.csv", "filter.csv", "linear_logprobs.png", "loss.png", "step.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {r["method"]: r for r in csv.DictReader(open(out / "linear_logprobs.csv"))}
    assert rows["naive"]["time_vs_naive"] == "1.0" and float(rows["ours_torch"]["median_s"]) > 0
    assert float(rows["ours_triton"]["median_s"]) > 0 and float(rows["ours_triton_fast"]["median_s"]) > 0
    assert "Triton-only" in rows["liger"]["error"]
    loss = {r["method"]: r for r in csv.DictReader(open(out / "loss.csv"))}
    assert all(float(loss[m]["median_s"]) > 0 for m in ("naive", "ours"))
    step = {r["method"]: r for r in csv.DictReader(open(out / "step.csv"))}
    assert set(step) == {"authors", "ours"} and all(float(r["median_s"]) > 0 for r in step.values())
    filtered = {r["method"]: r for r in csv.DictReader(open(out / "filter.csv"))}
    assert {r["inputs"] for r in filtered.values()} == {"lm_like"}
    assert all(float(filtered[m]["median_s"]) > 0 for m in ("ours_triton", "ours_triton_filter"))
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "## One LOGO step" in summary and "## Gradient filtering" in summary


def test_gpu_check_parses():
    result = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "make gpu-check" in result.stdout

"""bench/bench_verl.py runs end to end on a tiny case in verl's environment and writes its CSV and PNG."""
import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl lives in its own environment: make test-verl")
pytest.importorskip("matplotlib")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def test_bench_verl_smoke(tmp_path):
    out = tmp_path / "verl"
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_verl.py"), "--ns", "64", "--vocabs", "300", "--dim",
                    "16", "--rounds", "1", "--repeats", "1", "--out", str(out)], check=True, capture_output=True,
                   text=True, timeout=300)
    rows = {r["kernel"]: r for r in csv.DictReader(open(f"{out}.csv"))}
    assert set(rows) == {"verl_torch", "liger", "verl_triton", "ours"}
    assert "needs CUDA" in rows["verl_triton"]["error"]
    for kernel in ("verl_torch", "liger", "ours"):
        assert float(rows[kernel]["median_s"]) > 0 and float(rows[kernel]["time_vs_verl"]) > 0, kernel
    assert os.path.getsize(f"{out}.png") > 0

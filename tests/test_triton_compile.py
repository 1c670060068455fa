"""The Triton kernels compile for real GPUs (A100 sm_80, H100 sm_90) within their shared memory — checked
here without a GPU, in a process where the kernels are JIT functions rather than interpreted ones."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from logo_kernels.triton_kernels.configs import GPU_CONFIGS  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum)


def compile_rows(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def check(rows, expected):
    assert len(rows) == expected
    for row in rows:
        assert row["ptx"] and row["cubin"], row
        assert row["shared_bytes"] <= SHARED_MEMORY_LIMIT[row["sm"]], row


def test_default_tiles_compile_for_sm80_and_sm90():
    rows = compile_rows()
    check(rows, 2 * 2 * len(GPU_CONFIGS))  # sm_80 and sm_90, without and with gradient filtering
    assert sum(row["filter"] for row in rows) == 2 * len(GPU_CONFIGS)


@pytest.mark.slow
def test_every_autotune_candidate_compiles_for_sm80_and_sm90():
    check(compile_rows("--all"), 2 * sum(len(c) for c in GPU_CONFIGS.values()))

"""verl's own training engine (``FSDPEngineWithLMHead``, FSDP2 on gloo) runs PPO steps — compute_log_prob, then
update_policy with verl's ``ppo_loss`` — through our op exactly as through its own kernel
(tests/with_verl/verl_engine_script.py; real processes under torchrun)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl lives in its own environment: make test-verl")

SCRIPT = os.path.join(os.path.dirname(__file__), "verl_engine_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LR = 2e-3  # verl_engine_script.py's learning rate


def run_engine(tmp_path, name, *flags, processes=1):
    out = tmp_path / f"{name}.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(29400 + os.getpid() % 500)] if processes > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if "logo" in flags:  # the way verl's workers get it: enabled by verl's import of external modules
        env.update(VERL_USE_EXTERNAL_MODULES="logo_kernels.integrations.verl_autoenable", LOGO_VERL_BACKEND="cpp")
    result = subprocess.run(launcher + [SCRIPT, "--model-dir", str(tmp_path / "model"), "--out", str(out), *flags],
                            capture_output=True, text=True, timeout=600, env=env)
    return result, (json.loads(out.read_text()) if result.returncode == 0 else None)


def assert_same_steps(ours, theirs, tol=1e-5, across_worlds=False):
    """Every step's outputs and the parameters after the steps (lr 2e-3: Adam's normalised update turns fp32
    rounding of tiny gradients into ~1e-3 of the learning rate). The per-micro-batch losses verl reports are
    scaled by its data-parallel size (the mean over ranks is the global batch's): compared per rank count."""
    assert (ours["world"] == theirs["world"]) != across_worlds and len(ours["steps"]) == len(theirs["steps"]) == 3
    scaled = ("loss", "pg_loss", "entropy_loss")
    for step, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        for key in ("log_probs", "entropy", "grad_norm") + scaled:
            x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
            if key in scaled:
                x, y = x / ours["world"], y / theirs["world"]
            assert x.shape == y.shape and x.size > 0, (step, key)
            assert np.abs(x - y).max() <= tol * (1 + np.abs(y).max()), (step, key, np.abs(x - y).max())
    # Parameters: Adam's update lr * m / (sqrt(v) + eps) of an element whose gradient is a near-cancelling sum
    # (fp32 rounding of the same order as the element) may differ by up to lr per step; the parameters as a whole
    # agree to 1e-5 (a wrongly reduced gradient shows in the grad norms above: Adam hides a scale).
    assert ours["parameters"].keys() == theirs["parameters"].keys()
    for name in theirs["parameters"]:
        x, y = np.asarray(ours["parameters"][name]), np.asarray(theirs["parameters"][name])
        assert np.abs(x - y).max() <= LR, name
        assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y), (name, np.linalg.norm(x - y) / np.linalg.norm(y))


def test_fsdp2_engine_on_two_processes_equals_verls_kernel(tmp_path):
    """Tied head (verl's own kernel can run it), remove-padding: 3 PPO steps on 2 ranks."""
    theirs_run, theirs = run_engine(tmp_path, "verl", "--kernel", "verl", processes=2)
    assert theirs_run.returncode == 0, theirs_run.stderr[-3000:]
    ours_run, ours = run_engine(tmp_path, "logo", "--kernel", "logo", processes=2)
    assert ours_run.returncode == 0, ours_run.stderr[-3000:]
    assert ours["kernels"] == ["logo_kernels.integrations.verl.LogoFusedLinearForPPO", "logo_kernels.integrations.verl"]
    assert theirs["kernels"][0] == "verl.utils.experimental.torch_functional.FusedLinearForPPO"
    assert ours["forward"] == theirs["forward"] == "forward_with_torch_backend"
    assert_same_steps(ours, theirs)


@pytest.mark.parametrize("layout, backend", [("padded", "torch"), ("remove-padding", "triton")])
def test_padded_batches_and_the_triton_backend(tmp_path, layout, backend):
    """Without remove-padding the engine indexes [B, S] outputs; with it, the triton backend's drop-in returns
    flat ones, as verl's triton kernel does (that kernel needs CUDA: the reference is verl's torch kernel, the same
    mathematics). verl's triton backend without remove-padding fails on verl's side: the engine indexes its flat
    output with a [B, S] mask."""
    flags = ("--no-rmpad",) if layout == "padded" else ()
    theirs_run, theirs = run_engine(tmp_path, "verl", "--kernel", "verl", *flags)
    assert theirs_run.returncode == 0, theirs_run.stderr[-3000:]
    ours_run, ours = run_engine(tmp_path, "logo", "--kernel", "logo", "--backend", backend, *flags)
    assert ours_run.returncode == 0, ours_run.stderr[-3000:]
    assert ours["forward"] == f"forward_with_{backend}_backend"
    assert_same_steps(ours, theirs)


def test_fsdp2_with_an_untied_head_runs_on_ours(tmp_path):
    """verl shards an untied lm_head on its own; its fused forward hands the kernel that DTensor without running
    lm_head, so FSDP2 neither gathers it nor reduces its gradient, and verl's kernel cannot multiply it (verl issue
    #5633). Ours gathers it and averages its gradient over the ranks: 3 steps on 2 ranks equal one process running
    both ranks' data as one batch through verl's own kernel on the unwrapped module (no FSDP)."""
    broken_run, _ = run_engine(tmp_path, "verl-fsdp2", "--kernel", "verl", "--untied")
    assert broken_run.returncode != 0 and "DTensor" in broken_run.stderr
    theirs_run, theirs = run_engine(tmp_path, "verl-plain", "--kernel", "verl", "--untied", "--wrap", "none",
                                    "--shards", "2")
    assert theirs_run.returncode == 0, theirs_run.stderr[-3000:]
    ours_run, ours = run_engine(tmp_path, "logo", "--kernel", "logo", "--untied", processes=2)
    assert ours_run.returncode == 0, ours_run.stderr[-3000:]
    assert_same_steps(ours, theirs, across_worlds=True)

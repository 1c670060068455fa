"""DeepSpeed ZeRO on 2 CPU processes (gloo): the same losses as one process on the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from deepspeed_env import deepspeed_cpu_env

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--warmup-copy-steps", "0", "--warmup-sft-steps", "0", "--eval-niah-lengths", "", "--synthetic-train", "8",
        "--synthetic-eval", "2", "--synthetic-context-words", "120", "--window", "1024", "--max-context-tokens",
        "256", "--max-response-tokens", "40", "--tiny-hidden-size", "32", "--tiny-layers", "1",
        "--eval-max-new-tokens", "2", "--no-progress", "--warmup-steps", "1", "--max-steps", "3", "--save-every",
        "2"]


def launch(out_dir, *args, processes=1):
    env = deepspeed_cpu_env(OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, "-m", "logo.train"]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        command = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(29500 + os.getpid() % 1000),
                   "-m", "logo.train"]
    result = subprocess.run(command + TINY + ["--output-dir", str(out_dir), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return [r["loss"] for r in rows if r["kind"] == "train"], result.stdout


@pytest.mark.parametrize("zero_config, extra", [
    ("configs/zero2.json", []),
    ("configs/zero3.json", []),
    ("configs/zero3.json", ["--finetune", "lora", "--lora-r", "4", "--learning-rate", "1e-2"]),
    ("configs/zero3_offload.json", ["--finetune", "lora", "--lora-r", "4", "--learning-rate", "1e-2"]),
], ids=["zero2-full", "zero3-full-trainable-head", "zero3-lora", "zero3-offload-lora"])
def test_two_deepspeed_processes_match_one_process(tmp_path, zero_config, extra):
    single, _ = launch(tmp_path / "single", "--batch-rows", "2", *extra)
    double, stdout = launch(tmp_path / "ds", "--batch-rows", "1", "--deepspeed", zero_config, *extra, processes=2)
    assert "world size 2, DeepSpeed ZeRO-" + zero_config[len("configs/zero")] in stdout
    assert double == pytest.approx(single, rel=1e-5)
    assert single[0] != single[-1]
    assert os.path.isfile(tmp_path / "ds" / "checkpoints" / "step-3" / "trainer.pt")
    # the updated weights (every parameter, the trainable ZeRO-3 lm_head included) equal the 1-process run's; atol:
    # Adam's normalised update g / (|g| + eps) turns the fp32 rounding of a tiny gradient into up to ~1e-3 of the
    # learning rate (observed 2e-6 at lr 2e-3 on rarely used embedding rows)
    single_weights, ds_weights = final_weights(tmp_path / "single"), final_weights(tmp_path / "ds")
    assert single_weights.keys() == ds_weights.keys() and single_weights
    for name in single_weights:
        torch.testing.assert_close(ds_weights[name], single_weights[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if not extra:  # full fine-tuning: the (zero-initialised) head really trained
        assert single_weights["lm_head.weight"].abs().max() > 0


def final_weights(run_dir):
    from safetensors.torch import load_file

    final = os.path.join(run_dir, "final")
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(final, "adapter_model.safetensors")) else \
        "model.safetensors"
    return load_file(os.path.join(final, name))


def test_hf_apply_with_a_trainable_head_under_zero3_matches_one_process(tmp_path):
    """hf.apply's fused loss under ZeRO-3 (the head partitioned, trainable; the op gathers it for the forward and
    again for the backward): 2 processes = 1 process, losses and every updated weight."""
    env = deepspeed_cpu_env(OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tests", "zero3_hf_apply_script.py")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    for command, out in (([sys.executable, script], "single.pt"),
                         ([torchrun, "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200), script],
                          "zero3.pt")):
        result = subprocess.run(command + [str(tmp_path / out)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    single, zero3 = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "zero3.pt")
    assert zero3["losses"] == pytest.approx(single["losses"], rel=1e-5) and single["losses"][0] != single["losses"][-1]
    for name, value in single["weights"].items():
        torch.testing.assert_close(zero3["weights"][name], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")

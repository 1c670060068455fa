"""DeepSpeed ZeRO on 2 CPU processes (gloo): the same losses as one process on the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic-train", "8", "--synthetic-eval", "2", "--synthetic-context-words", "120", "--window", "1024",
        "--max-context-tokens", "256", "--max-response-tokens", "40", "--tiny-hidden-size", "32", "--tiny-layers", "1",
        "--eval-max-new-tokens", "2", "--no-progress", "--warmup-steps", "1", "--max-steps", "3", "--save-every", "2"]


def launch(out_dir, *args, processes=1):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.join(ROOT, ".cache", "torch_extensions")))
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
    ("configs/zero3.json", ["--finetune", "lora", "--lora-r", "4", "--learning-rate", "1e-2"]),
    ("configs/zero3_offload.json", ["--finetune", "lora", "--lora-r", "4", "--learning-rate", "1e-2"]),
], ids=["zero2-full", "zero3-lora", "zero3-offload-lora"])
def test_two_deepspeed_processes_match_one_process(tmp_path, zero_config, extra):
    single, _ = launch(tmp_path / "single", "--batch-rows", "2", *extra)
    double, stdout = launch(tmp_path / "ds", "--batch-rows", "1", "--deepspeed", zero_config, *extra, processes=2)
    assert "world size 2, DeepSpeed ZeRO-" + zero_config[len("configs/zero")] in stdout
    assert double == pytest.approx(single, rel=1e-5)
    assert single[0] != single[-1]
    assert os.path.isfile(tmp_path / "ds" / "checkpoints" / "step-3" / "trainer.pt")
    assert os.path.isdir(tmp_path / "ds" / "final")

"""The memory estimator: validated against traced live tensor bytes of real CPU steps; the paper's OOM."""
import inspect
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from logo.estimate import BUILTIN, GIB, ModelShape, Setting, estimate, fits, main, model_shape  # noqa: E402
from logo.memory_trace import peak_of_a_training_step  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_step  # noqa: E402


def traced_step_bytes(method, context, response, negatives, vocab, dim, layers, checkpointing):
    """Peak live tensor bytes of the second full training step (AdamW states exist by then)."""
    step = bench_step.build_step(method, context, response, negatives, vocab, dim, layers)
    closure = inspect.getclosurevars(step).nonlocals
    model, loss = closure["model"], closure["loss"]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    return peak_of_a_training_step(model, loss, optimizer), model.config


CASES = [  # method, context, response, M, vocab, dim, layers, checkpointing
    ("authors", 512, 64, 2, 4000, 128, 2, False),
    ("ours", 512, 64, 2, 4000, 128, 2, False),
    ("authors", 1024, 128, 1, 8000, 128, 2, False),
    ("ours", 1024, 128, 3, 8000, 128, 2, False),
    ("ours", 2048, 128, 2, 4000, 256, 3, True),
    ("authors", 1024, 128, 2, 4000, 256, 3, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-C{c[1]}-M{c[3]}-V{c[4]}-D{c[5]}{'-ckpt' if c[7] else ''}"
                                             for c in CASES])
def test_estimate_matches_traced_peak_within_15_percent(case):
    method, context, response, negatives, vocab, dim, layers, checkpointing = case
    peak, config = traced_step_bytes(*case)
    shape = ModelShape("tiny", vocab, dim, config.intermediate_size, layers, config.num_attention_heads,
                       config.num_key_value_heads)
    setting = Setting(real_tokens=context, negatives=negatives, response_tokens=response, sft_weight=0.0,
                      finetune="full", zero=0, gpus=1, dtype="fp32", checkpointing=checkpointing,
                      loss="naive" if method == "authors" else "fused",
                      packing="separate" if method == "authors" else "shared",
                      overhead_gib=0.0, fragmentation=0.0, workspace_gib=0.0)
    predicted = estimate(shape, setting)["total"]
    assert 0.85 <= predicted / peak <= 1.15, f"predicted {predicted / 2**20:.1f} MiB, traced {peak / 2**20:.1f} MiB"


def paper(negatives, sft_weight, **kw):
    return Setting(real_tokens=8192, negatives=negatives, sft_weight=sft_weight, offload="all", **kw)


def test_authors_path_reproduces_the_paper_oom_and_ours_fits():
    llama = BUILTIN["llama-3-8b"]
    authors = dict(loss="naive", packing="separate")
    assert fits(estimate(llama, paper(3, 0.0, **authors))["total"], "A800-80GB")       # trained in the paper
    assert not fits(estimate(llama, paper(3, 0.1, **authors))["total"], "A800-80GB")   # the paper's OOM (Fig. 6c)
    assert fits(estimate(llama, paper(2, 0.1, **authors))["total"], "A800-80GB")
    for negatives in (2, 3, 4, 8):
        assert fits(estimate(llama, paper(negatives, 0.1))["total"], "A800-80GB")
    long = Setting(real_tokens=81920, window=81920, negatives=2, offload="all")
    assert fits(estimate(llama, long)["total"], "A800-80GB")                          # 80K real tokens, ours


def test_shapes_and_parameter_counts(tmp_path):
    assert abs(BUILTIN["llama-3-8b"].parameters() - 8.03e9) < 0.01e9
    assert abs(BUILTIN["mistral-7b"].parameters() - 7.24e9) < 0.01e9
    assert abs(BUILTIN["llama-2-7b"].parameters() - 6.74e9) < 0.01e9
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(str(tmp_path))
    shape = model_shape(str(tmp_path))
    assert shape.parameters() == sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    with pytest.raises(ValueError, match="neither a built-in shape"):
        model_shape(str(tmp_path / "missing"))
    # explicit head sizes (Gemma 3, GPT-OSS: heads x head_dim != hidden) and a mixture of experts (all experts count)
    for name, config in (("head_dim", transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2, head_dim=24)),
                         ("moe", transformers.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=40,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, num_local_experts=5,
                                                            num_experts_per_tok=2))):
        config.save_pretrained(str(tmp_path / name))
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert model_shape(str(tmp_path / name)).parameters() == sum(p.numel() for p in model.parameters()), name
    # built-in shapes of this round: the published sizes
    for name, billions in (("qwen2.5-7b", 7.62), ("qwen3-8b", 8.19), ("gemma-3-12b", 11.77), ("gpt-oss-20b", 20.91)):
        assert abs(BUILTIN[name].parameters() / 1e9 - billions) < 0.01, name
    with pytest.raises(ValueError, match="loss must be one of"):
        estimate(shape, Setting(loss="magic"))


def test_cli_prints_a_table_with_a_verdict(capsys):
    assert main(["--negatives", "3", "--compare", "--offload", "all"]) == 0
    text = capsys.readouterr().out
    assert "authors (naive)" in text and "ours (fused)" in text
    assert text.splitlines()[-2].split()[1:] == ["OOM", "fits"]
    assert main(["--json", "--model", "mistral-7b", "--gpu", "H100-80GB"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["fits"] and row["gib"]["total"] * GIB == pytest.approx(
        estimate(BUILTIN["mistral-7b"], Setting())["total"])


@pytest.mark.parametrize("option, message", [
    (["--real-tokens", "-8192"], "real_tokens must be an integer >= 1, got -8192"),
    (["--negatives", "0"], "negatives must be an integer >= 1"),
    (["--gpus", "0"], "gpus must be an integer >= 1"),
    (["--overhead-gib", "-2"], "overhead_gib must be a finite number >= 0"),
    (["--fragmentation", "1.5"], "fragmentation is a fraction of the rest"),
    (["--sft-weight", "nan"], "sft_weight must be a finite number >= 0"),
    (["--model", "/no/such/config.json"], "is neither a built-in shape"),
])
def test_cli_refuses_bad_sizes_with_one_line(capsys, option, message):
    """Negative sizes and overheads used to print negative GiB as 'fits'."""
    assert main(option) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("logo.estimate: error: ") and message in err[0], err


def test_model_config_with_bad_sizes_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"vocab_size": 100, "hidden_size": -64, "intermediate_size": 128, '
                                          '"num_hidden_layers": 2, "num_attention_heads": 4}')
    assert main(["--model", str(tmp_path)]) == 2
    assert "hidden_size = -64" in capsys.readouterr().err

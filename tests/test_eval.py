"""python -m logo.eval: NIAH placement and scores, the retrieval-score arithmetic, perplexity by position,
the lm-evaluation-harness wrapper on a local task, run-directory loading, atomic outputs and clear errors."""
import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from logo.data.tokenizer import default_tokenizer  # noqa: E402
from logo.eval import niah, ppl  # noqa: E402
from logo.eval.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["single", "multi"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("fmt", ["ruler", "kv"])
def test_needles_sit_at_the_stated_depths(tokenizer, mode, depth, fmt):
    options = niah.NiahOptions(format=fmt, values=3)
    haystack = niah._haystack_ids(tokenizer)
    case = niah.build_case(tokenizer, haystack, 300, depth, mode, options, random.Random(1))
    assert case.context_end - case.context_start == 300  # exactly the real context length asked for
    needle_lengths = [len(tokenizer(" " + niah.FORMATS[fmt]["needle"].format(key=case.key, value=v),
                                    add_special_tokens=False)["input_ids"]) for v in case.values]
    filler = 300 - sum(needle_lengths)
    first = case.needle_starts[0] - case.context_start
    assert first == round(depth * filler)  # the first needle at round(depth x filler tokens)
    for start, value, length in zip(case.needle_starts, case.values, needle_lengths):
        text = tokenizer.decode(case.prompt[start:start + length])
        assert case.key in text and value in text
    assert [tokenizer.decode([case.prompt[p]]).strip() for p in case.value_positions]  # value tokens located
    assert "".join(tokenizer.decode([case.prompt[p]]) for p in case.value_positions).replace(" ", "") == \
        "".join(case.values)
    assert len(case.values) == (1 if mode == "single" else 3)


def test_answer_scores():
    case = niah.NiahCase(100, 0.5, "multi", "violin", ["1234567", "7654321", "1111111"], [], 0, 0,
                         gold="1234567, 7654321, 1111111")
    assert niah.score_answer(case, "1234567, 7654321, 1111111", "ruler") == {"exact_match": 1.0, "recall": 1.0}
    assert niah.score_answer(case, "7654321 and 1234567", "ruler") == {"exact_match": 0.0, "recall": pytest.approx(2 / 3)}
    assert niah.score_answer(case, "1234567, 7654321, 1111111, 9999999", "ruler")["exact_match"] == 0.0  # extra value
    assert niah.score_answer(case, "12345678", "ruler")["recall"] == 0.0  # no partial-number credit
    kv = niah.NiahCase(100, 0.5, "multi", "violin", ["harvest", "copper"], [], 0, 0,
                       gold="Pairs: violin harvest, violin copper")
    assert niah.score_answer(kv, " Pairs: violin harvest,  violin copper", "kv") == {"exact_match": 1.0, "recall": 1.0}
    assert niah.score_answer(kv, "Pairs: violin copper", "kv") == {"exact_match": 0.0, "recall": 0.5}


def test_retrieval_score_arithmetic():
    """2 layers x 3 heads; value tokens at prompt positions 5 and 6 (ids 50, 60); generated: 60, 99, 50."""
    prompt = [0, 1, 2, 3, 4, 50, 60, 7, 8, 9]
    case = niah.NiahCase(8, 0.5, "single", "k", ["v"], prompt, context_start=1, context_end=9,
                         value_positions=[5, 6])
    generated = [60, 99, 50]
    attentions = []
    for step, target in enumerate([6, 6, 5]):
        a = torch.full((2, 3, len(prompt) + step), 0.01)
        a[0, 0, target] = 1.0  # head (0,0) follows the generated value every time it is one: {6, 5} -> 1.0
        a[0, 1, 6] = 1.0       # head (0,1) always on position 6: right at steps 0 only -> {6} -> 0.5
        a[1, 2, 3] = 1.0       # head (1,2) on filler -> 0
        a[1, 0, 0] = 1.0       # head (1,0) on the template before the context: argmax inside the context only
        attentions.append(a)
    scores = niah.retrieval_head_scores(attentions, generated, case, prompt)
    assert scores[0, 0] == 1.0 and scores[0, 1] == 0.5 and scores[1, 2] == 0.0
    assert niah.model_retrieval_score(torch.tensor([[1.0, 0.5, 0.05]])) == pytest.approx(0.75)  # 0.05 < 0.1 dropped
    assert niah.model_retrieval_score(torch.tensor([[0.05, 0.0]])) == 0.0
    many = torch.arange(1, 21, dtype=torch.float).div(20).view(4, 5)  # 0.05 .. 1.0
    assert niah.model_retrieval_score(many) == pytest.approx(sum(range(11, 21)) / 20 / 10)  # the best 10


def test_niah_end_to_end_with_retrieval_score(tmp_path, model_dir, capsys):
    out = tmp_path / "niah"
    assert main(["niah", "--model", model_dir, "--out", str(out), "--lengths", "64", "128", "--depths", "0", "1",
                 "--samples", "1", "--values", "2", "--max-new-tokens", "4", "--attn", "eager", "--retrieval-score",
                 "--format", "kv", "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == ["cells.csv", "niah.csv", "niah.png", "results.json"]
    assert not any(name.startswith("niah.tmp") for name in os.listdir(tmp_path))
    results = json.load(open(out / "results.json"))
    assert {"single", "multi", "retrieval_score"} <= set(results["summary"])
    cells = [c for c in results["cells"] if c["depth"] == "all"]
    assert {(c["mode"], c["length"]) for c in cells} == {(m, n) for m in ("single", "multi") for n in (64, 128)}
    assert "recall" in capsys.readouterr().out
    assert main(["niah", "--model", model_dir, "--out", str(out), "--no-progress"]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err


def test_batched_and_one_by_one_generation_agree(tokenizer, model_dir):
    from logo.eval.loading import load_for_eval

    loaded = load_for_eval(model_dir, attn_implementation="eager")
    options = niah.NiahOptions(lengths=(48, 96), depths=(0.5,), modes=("single",), samples=2, format="kv",
                               max_new_tokens=3, batch_size=4)
    batched = niah.run(loaded.model, tokenizer, options, progress=False)
    options.batch_size = 1
    single = niah.run(loaded.model, tokenizer, options, progress=False)
    assert [r["answer"] for r in batched["rows"]] == [r["answer"] for r in single["rows"]]


def test_perplexity_by_position_equals_the_models_own(tmp_path, model_dir, tokenizer):
    from logo.eval.loading import load_for_eval

    model = load_for_eval(model_dir).model
    ids = torch.randint(0, len(tokenizer), (2, 40))
    nll = ppl.token_nll(model, ids)
    logits = model(input_ids=ids).logits
    expected = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)
    out = tmp_path / "ppl"
    assert main(["ppl", "--model", model_dir, "--out", str(out), "--lengths", "64", "128", "--bucket", "32",
                 "--documents", "2", "--no-progress"]) == 0
    results = json.load(open(out / "results.json"))
    assert set(results["summary"]) == {"64", "128"} and results["summary"]["64"]["ppl"] > 1
    rows = list(open(out / "ppl.csv"))
    assert len(rows) == 1 + 2 + 4  # header, 64 tokens / 32, 128 / 32 buckets
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "The lighthouse keeper painted the tower. " * 40}) + "\n")
    assert main(["ppl", "--model", model_dir, "--out", str(tmp_path / "ppl2"), "--lengths", "32", "--file", str(docs),
                 "--no-progress"]) == 0


def test_harness_runs_a_local_task(tmp_path, model_dir):
    pytest.importorskip("lm_eval")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7)],
                                        "label": 0}) + "\n" for i in range(4)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""")
    out = tmp_path / "harness"
    assert main(["harness", "--model", model_dir, "--out", str(out), "--tasks", "tiny_mc", "--include-path",
                 str(tasks), "--batch-size", "2", "--no-progress"]) == 0
    results = json.load(open(out / "results.json"))
    assert "tiny_mc" in results["results"]["results"]
    assert 0.0 <= results["results"]["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert os.path.getsize(out / "harness.png") > 0


def test_a_logo_train_run_directory_loads_as_trained(tmp_path):
    import logo.train as train_module
    from logo.config import parse_config
    from logo.eval.loading import load_for_eval

    config, _ = parse_config(["--warmup-copy-steps", "0", "--warmup-sft-steps", "0", "--eval-niah-lengths", "",
                              "--synthetic-train", "4", "--synthetic-eval", "0", "--synthetic-context-words", "60",
                              "--window", "1024", "--max-context-tokens", "128", "--max-response-tokens", "24",
                              "--tiny-hidden-size", "32", "--tiny-layers", "1", "--max-steps", "1", "--no-progress",
                              "--output-dir", str(tmp_path / "run")])
    train_module.train(config)
    loaded = load_for_eval(str(tmp_path / "run"))
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), saved.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert "final/" in loaded.source


@pytest.mark.parametrize("argv, message", [
    (["niah", "--model", "/no/such/model", "--out", "{tmp}/o"], "--model: /no/such/model is not a directory"),
    (["niah", "--model", "{model}", "--out", "{tmp}/o", "--depths", "1.5"], "--depths must lie in [0, 1]"),
    (["niah", "--model", "{model}", "--out", "{tmp}/o", "--retrieval-score"], "load the model with --attn eager"),
    (["harness", "--model", "{model}", "--out", "{tmp}/o", "--tasks", "no_such_task", "--include-path", "{tmp}"],
     "unknown task(s) ['no_such_task']"),
])
def test_user_errors_are_one_line(tmp_path, model_dir, capsys, argv, message):
    if argv[0] == "harness":
        pytest.importorskip("lm_eval")
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("logo.eval: error: ") and message in err[0], err
    assert not (tmp_path / "o").exists() and not any(".tmp-" in p for p in os.listdir(tmp_path))

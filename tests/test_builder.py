"""The data builder: raw records -> generated preference records, end to end with a tiny model."""
import json

import pytest

transformers = pytest.importorskip("transformers")

from logo.data.builder import BuildOptions, build, degenerate, main, read_raw_file, select_chunks  # noqa: E402
from logo.data.importance import chunk_scores, salient_terms  # noqa: E402
from logo.data.records import read_preference_file  # noqa: E402
from logo.data.tokenizer import default_tokenizer, shipped_text  # noqa: E402

NEEDLE = "The lighthouse keeper Bartholomew painted the tower crimson in 1887."


def raw_lines():
    filler = shipped_text()[:3000]
    context = filler[:1500] + " " + NEEDLE + " " + filler[1500:]
    return [
        {"id": "a", "context": context, "question": "What colour did Bartholomew paint the lighthouse tower?",
         "answer": "crimson"},
        {"id": "b", "context": [filler[:1200], NEEDLE, filler[1200:2400]], "question": "When was the tower painted by "
         "the keeper Bartholomew?"},
        {"id": "c", "context": filler[:2000], "question": "Zyxwv qwerty?"},  # nothing relevant: skipped
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_salient_terms_and_scores():
    assert salient_terms("The keeper painted THE tower in 1887, didn't he?") >= {"keeper", "painted", "tower", "1887"}
    assert "the" not in salient_terms("The the the")
    scores = chunk_scores(["nothing here at all", NEEDLE], "Who painted the lighthouse?", "Bartholomew")
    assert scores[0] == 0 and scores[1] >= 3


def test_select_chunks_and_degenerate():
    critical, irrelevant = select_chunks([0, 5, 2, 0, 7], BuildOptions(num_critical=2, min_score=1))
    assert critical == [1, 4] and irrelevant == [0, 3, 2]
    assert select_chunks([0, 0], BuildOptions(min_score=1))[0] == []
    assert degenerate("", ["x", "y"]) == "empty response"
    assert degenerate("The Answer", ["the  answer", "y"]) == "a rejected response equals the chosen one"
    assert degenerate("a", ["b", "c"]) is None


def test_raw_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text('{"id": "x", "context": "c", "question": "q"}\n{"id": "x", "context": "", "question": 3}\nnope\n')
    with pytest.raises(ValueError) as error:
        read_raw_file(str(path))
    text = str(error.value)
    assert "raw.jsonl:2: context" in text and "raw.jsonl:2: question" in text and "raw.jsonl:2: id: duplicate" in text
    assert "raw.jsonl:3: record: invalid JSON" in text


def test_build_end_to_end_with_a_tiny_model_and_resume(tmp_path, capsys):
    tokenizer = default_tokenizer()
    model_dir = tmp_path / "model"
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    raw, out = tmp_path / "raw.jsonl", tmp_path / "prefs.jsonl"
    write_jsonl(raw, raw_lines()[:2] + raw_lines()[2:])
    args = ["build", "--input", str(raw), "--model", str(model_dir), "--out", str(out), "--chunk-tokens", "64",
            "--num-critical", "2", "--context-chunks", "6", "--max-new-tokens", "8", "--no-progress"]
    assert main(args) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["skipped_no_critical"] == 1 and counts["built"] + counts["dropped_degenerate"] == 2
    records = read_preference_file(str(out), num_negatives=2)
    assert [r.id for r in records] == ["a", "b"][:counts["built"]]
    for r in records:
        assert any(NEEDLE[:30] in chunk or "Bartholomew" in chunk for chunk in r.context)  # critical kept
        assert len(r.context) <= 6 and r.chosen and all(r.rejected)
    assert not (tmp_path / "prefs.jsonl.partial").exists()
    # a second run skips what is built; a new input record is the only one generated
    write_jsonl(raw, raw_lines() + [dict(raw_lines()[0], id="d")])
    assert main(args) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["already_built"] == len(records) and counts["input"] == 4
    assert {r.id for r in read_preference_file(str(out), num_negatives=2)} >= {r.id for r in records}


def test_build_drops_degenerate_samples(tmp_path):
    tokenizer = default_tokenizer()
    raw = read_raw_file_from(tmp_path, raw_lines()[:2])
    replies = iter([["same", "same", "other", "good", "bad", "worse"]])
    counts = build(raw, tokenizer, lambda prompts: next(replies), str(tmp_path / "o.jsonl"),
                   BuildOptions(chunk_tokens=64, num_critical=2), progress=False)
    assert counts["dropped_degenerate"] == 1 and counts["built"] == 1
    (record,) = read_preference_file(str(tmp_path / "o.jsonl"), num_negatives=2)
    assert (record.id, record.chosen, record.rejected) == ("b", "good", ("bad", "worse"))


def read_raw_file_from(tmp_path, rows):
    path = tmp_path / "raw.jsonl"
    write_jsonl(path, rows)
    return read_raw_file(str(path))

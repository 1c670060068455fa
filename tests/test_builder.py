"""The data builder: raw records -> generated preference records, end to end with a tiny model."""
import json

import pytest

transformers = pytest.importorskip("transformers")

from logo.data.builder import (BuildOptions, build, degenerate, first_question, main, prompt_chunks,  # noqa: E402
                                read_general_docs, read_raw_file, select_chunks, split_chunks)
from logo.data.importance import chunk_scores, make_scorer, salient_terms  # noqa: E402
from logo.data.records import read_preference_file  # noqa: E402
from logo.data.corpus import shipped_text  # noqa: E402
from logo.data.tokenizer import default_tokenizer  # noqa: E402

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


def test_select_chunks_follow_n_and_delta():
    """Critical: score > delta, at most N / 2 of them; irrelevant: the lowest-scored chunks up to N in all."""
    scores = [0, 5, 2, 0, 7, 9, 1, 0, 3, 4]
    critical, irrelevant = select_chunks(scores, BuildOptions(context_chunks=6), delta=1)
    assert critical == [1, 4, 5] and irrelevant == [0, 3, 7]  # top 3 = N / 2, the 3 zero-scored ones
    critical, irrelevant = select_chunks(scores, BuildOptions(context_chunks=6, max_critical=1), delta=1)
    assert critical == [5] and irrelevant == [0, 3, 7, 6, 2]
    assert select_chunks(scores, BuildOptions(context_chunks=6), delta=9)[0] == []  # nothing > delta
    assert select_chunks([3, 0], BuildOptions(context_chunks=16), delta=0) == ([0], [1])  # fewer chunks than N


def test_the_hallucination_negative_never_holds_every_critical_chunk():
    """Paper: dis-preference 2 = pi(Q, irrelevant + critical chunks). The best-scored critical chunks are left
    out (the lowest-scored half, floor, is kept), so with one critical chunk the negative holds none of it."""
    scores = [0, 9, 1, 0, 2, 0, 5, 7]
    options = BuildOptions(context_chunks=8, max_critical=1)
    critical, irrelevant = select_chunks(scores, options, delta=2)
    chosen, unfollowing, hallucination = prompt_chunks(scores, critical, irrelevant)
    assert chosen == [1] and unfollowing == [0] and hallucination == [3]  # no critical chunk, another irrelevant one
    for k, kept in ((2, [7]), (3, [6]), (4, [4, 6])):  # critical by score: 1 (9), 7 (7), 6 (5), 4 (4)
        scores = [0, 9, 1, 0, 4, 0, 5, 7, 0, 0]
        critical, irrelevant = select_chunks(scores, BuildOptions(context_chunks=10, max_critical=k), delta=3)
        chosen, unfollowing, hallucination = prompt_chunks(scores, critical, irrelevant)
        assert len(chosen) == len(unfollowing) == len(hallucination) == k
        assert set(hallucination) & set(critical) == set(kept) and 1 not in hallucination
        assert not set(unfollowing) & set(critical) and set(hallucination) - set(kept) <= set(irrelevant)


def test_degenerate_and_first_question():
    assert degenerate("", ["x", "y"]) == "empty response"
    assert degenerate("The Answer", ["the  answer", "y"]) == "a rejected response equals the chosen one"
    assert degenerate("a", ["b", "c"]) is None
    assert first_question("Sure!\n  Who painted the tower?  \nMore") == "Who painted the tower?"
    assert first_question("No question here.") is None


def test_entity_scorer_counts_named_entities_shared_with_the_question():
    """The paper's scorer on a real spaCy pipeline (a blank English one with an entity ruler: no download)."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Bartholomew"},
                                               {"label": "DATE", "pattern": "1887"},
                                               {"label": "GPE", "pattern": "Dover"}])
    scorer = make_scorer("entities", nlp=nlp)
    assert scorer.name == "entities" and scorer.delta == 6  # the paper's threshold
    scores = scorer.scores(["Bartholomew came to Dover in 1887.", "Nothing about anyone.", "Dover only."],
                           "When did Bartholomew reach Dover?", answer="1887")
    assert scores == [2, 0, 1]  # entities of the question only (the answer is the release's variant)
    with pytest.raises(ValueError, match="needs a pipeline with a tagger"):
        make_scorer("release", nlp=nlp)


def test_auto_scorer_falls_back_to_word_overlap_and_says_so():
    said = []
    scorer = make_scorer("auto", spacy_model="/no/such/pipeline", log=said.append)
    assert scorer.name == "words" and scorer.delta == 1 and "word overlap" in said[0]
    with pytest.raises(ValueError, match="--scorer entities needs spaCy"):
        make_scorer("entities", spacy_model="/no/such/pipeline")


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
            "--max-critical", "2", "--context-chunks", "6", "--max-new-tokens", "8", "--no-progress", "--scorer", "words"]
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
                   BuildOptions(chunk_tokens=64, max_critical=2, scorer="words"), progress=False)
    assert counts["dropped_degenerate"] == 1 and counts["built"] == 1
    (record,) = read_preference_file(str(tmp_path / "o.jsonl"), num_negatives=2)
    assert (record.id, record.chosen, record.rejected) == ("b", "good", ("bad", "worse"))


def read_raw_file_from(tmp_path, rows):
    path = tmp_path / "raw.jsonl"
    write_jsonl(path, rows)
    return read_raw_file(str(path))


def echo_generate(prompts):
    """A deterministic 'policy': answers with a digest of its prompt (distinct prompts, distinct answers)."""
    return [f"answer {sum(p) % 9973} of {len(p)}" for p in prompts]


def test_the_training_context_is_the_scored_chunks(tmp_path):
    """One chunking, carried through the record: the written context is exactly N of the builder's chunks, in
    order, and encoding keeps them as the chunks positional synthesis moves."""
    from logo.data.encoding import encode_record

    tokenizer = default_tokenizer()
    raw = read_raw_file_from(tmp_path, raw_lines()[:1])
    options = BuildOptions(chunk_tokens=48, context_chunks=6, scorer="words")
    build(raw, tokenizer, echo_generate, str(tmp_path / "o.jsonl"), options, progress=False)
    (record,) = read_preference_file(str(tmp_path / "o.jsonl"), num_negatives=2)
    chunks = split_chunks(tokenizer, raw[0].context, 48)
    assert len(record.context) == 6 and all(c in chunks for c in record.context)
    assert [chunks.index(c) for c in record.context] == sorted(chunks.index(c) for c in record.context)
    assert any("Bartholomew" in c for c in record.context)  # the critical chunk is kept
    encoded = encode_record(record, tokenizer, num_negatives=2)
    assert len(encoded.chunk_lengths(512)) == 6 and sum(encoded.chunk_lengths(512)) == len(encoded.context)


def test_general_documents_get_generated_questions(tmp_path):
    tokenizer = default_tokenizer()
    docs_path = tmp_path / "docs.jsonl"
    write_jsonl(docs_path, [{"id": 1, "text": raw_lines()[0]["context"]}, {"id": 2, "text": "Too short to ask."}])
    docs = read_general_docs(str(docs_path))
    assert [d.id for d in docs] == ["general-1", "general-2"] and docs[0].question is None

    def policy(prompts):
        if len(prompts) == 2 and "ask one question" in tokenizer.decode(prompts[0]):
            return ["Here you go:\nWho painted the lighthouse tower crimson?", "I cannot."]
        return echo_generate(prompts)

    counts = build([], tokenizer, policy, str(tmp_path / "o.jsonl"),
                   BuildOptions(chunk_tokens=48, context_chunks=6, scorer="words"), progress=False, general=docs)
    assert counts["skipped_no_question"] == 1 and counts["built"] == 1 and counts["general_input"] == 2
    (record,) = read_preference_file(str(tmp_path / "o.jsonl"), num_negatives=2)
    assert record.id == "general-1" and record.question == "Who painted the lighthouse tower crimson?"


def test_the_manifest_records_the_generator_and_resuming_with_another_is_refused(tmp_path):
    from logo.data.builder import generator_options
    from logo.data.endpoint import EndpointOptions
    from logo.errors import RunDirectoryError

    tokenizer = default_tokenizer()
    raw = read_raw_file_from(tmp_path, raw_lines()[:2])
    out = str(tmp_path / "o.jsonl")
    options = BuildOptions(chunk_tokens=64, max_critical=2, scorer="words")
    served = generator_options(EndpointOptions("http://user:secret@127.0.0.1:1/v1", "served-name",
                                               prompt_format="tokens"))
    build(raw[:1], tokenizer, echo_generate, out, options, progress=False, generator=served)
    manifest = json.loads(open(out + ".build.json").read())
    assert {k: manifest["options"][k] for k in ("generator", "endpoint_model", "prompt_format", "scorer")} == {
        "generator": "endpoint", "endpoint_model": "served-name", "prompt_format": "tokens", "scorer": "words"}
    assert "127.0.0.1" not in json.dumps(manifest) and "secret" not in json.dumps(manifest)  # not the URL
    with pytest.raises(RunDirectoryError, match="--generator: 'endpoint' -> 'in-process'"):
        build(raw, tokenizer, echo_generate, out, options, progress=False)
    assert build(raw, tokenizer, echo_generate, out, options, progress=False, generator=served)["built"] == 1


@pytest.mark.parametrize("kill", ["before_first_batch", "torn_last_line", "lost_newline"])
def test_build_resumes_from_any_kill_point(tmp_path, kill):
    tokenizer = default_tokenizer()
    raw = read_raw_file_from(tmp_path, raw_lines()[:2])
    out = tmp_path / "o.jsonl"
    options = BuildOptions(chunk_tokens=64, max_critical=2, scorer="words", batch_size=1)
    build(raw[:1], tokenizer, echo_generate, str(out), options, progress=False)
    first = out.read_text()
    out.unlink()
    partial = tmp_path / "o.jsonl.partial"
    if kill == "before_first_batch":
        partial.write_text("")
    elif kill == "torn_last_line":
        partial.write_text(first + first[:40])  # one complete record, then a torn one
    else:
        partial.write_text(first.rstrip("\n"))  # the last record lost only its newline
    counts = build(raw, tokenizer, echo_generate, str(out), options, progress=False)
    records = read_preference_file(str(out), num_negatives=2)
    assert sorted(r.id for r in records) == ["a", "b"] and not partial.exists()
    assert counts["already_built"] == (0 if kill == "before_first_batch" else 1)


def test_a_run_where_everything_is_skipped_writes_nothing(tmp_path, capsys):
    tokenizer = default_tokenizer()
    model_dir = tmp_path / "model"
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    raw = tmp_path / "raw.jsonl"
    write_jsonl(raw, [raw_lines()[2]])  # nothing relevant
    out = tmp_path / "o.jsonl"
    code = main(["build", "--input", str(raw), "--model", str(model_dir), "--out", str(out), "--no-progress",
                 "--scorer", "words", "--chunk-tokens", "64"])
    assert code == 1 and not out.exists() and not (tmp_path / "o.jsonl.partial").exists()
    assert "nothing built, nothing written: 1 record(s) without a critical chunk" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--input", "/no/such.jsonl"], "/no/such.jsonl: no such raw QA file"),
    (["--model", "/no/model"], "--model: /no/model is not an existing directory"),
    (["--context-chunks", "1"], "--context-chunks must be >= 2"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--input", None], "give --input (QA records) and/or --general-docs"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, args, message):
    write_jsonl(tmp_path / "raw.jsonl", raw_lines()[:1])
    base = {"--input": str(tmp_path / "raw.jsonl"), "--model": str(tmp_path), "--out": str(tmp_path / "o.jsonl")}
    if args[-1] is None:
        del base[args[0]]
        args = []
    argv = ["build"]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("logo.data: error: ") and message in err[0] and "Traceback" not in "".join(err)


def test_non_utf8_raw_file_names_its_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(json.dumps(raw_lines()[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"raw.jsonl:2: not UTF-8 text"):
        read_raw_file(str(path))

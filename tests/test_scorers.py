"""Chunk scorers with a *trained* statistical pipeline (tests/ner_pipeline.py): the default finds the chunks that
answer realistic questions, the paper's literal reading finds none (issue 24)."""
import os
import sys

import pytest

spacy = pytest.importorskip("spacy")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from scorer_report import EXAMPLES, evaluate, load_realistic_set  # noqa: E402

from logo.data.importance import make_scorer  # noqa: E402


@pytest.fixture(scope="module")
def nlp(trained_nlp_path):
    return spacy.load(trained_nlp_path)


@pytest.fixture(scope="module")
def documents():
    return load_realistic_set()


def test_the_realistic_set_is_well_formed(documents):
    questions = [q for d in documents for q in d["questions"]]
    assert len(questions) >= 50 and len({q["id"] for q in questions}) == len(questions)
    for d in documents:
        assert all(isinstance(c, str) and c.strip() for c in d["chunks"])
        for q in d["questions"]:
            assert q["answer_chunks"] and all(0 <= i < len(d["chunks"]) for i in q["answer_chunks"])


def test_the_trained_pipeline_predicts_entities_and_parts_of_speech(nlp):
    doc = nlp("Tobias Kingsley was elected in Lisbon in 1812 and walked to Vienna.")
    assert {"Tobias Kingsley", "Lisbon", "1812", "Vienna"} <= {e.text for e in doc.ents}
    assert {t.text: t.pos_ for t in doc}["elected"] == "VERB" and {t.text: t.lemma_ for t in doc}["walked"] == "walk"


def test_the_test_pipeline_is_held_out_from_the_realistic_set(documents):
    """No name the pipeline is trained on and no verb of its templates occurs in the set's questions or answers,
    and it is trained on none of the set's text (tests/ner_pipeline.py)."""
    import re

    import ner_pipeline

    asked = "\n".join(f"{q['question']}\n{q['answer'] or ''}" for d in documents for q in d["questions"])
    occurs = lambda word, flags=0: re.search(rf"(?<!\w){re.escape(word)}(?!\w)", asked, flags)  # noqa: E731
    names = [n for group in ("FIRST", "LAST", "SINGLE", "GPE", "LOC", "ORG", "DATE", "WORK", "NORP", "FAC")
             for n in getattr(ner_pipeline, group)]
    assert [n for n in names if occurs(n) or occurs(re.sub(r"^the ", "", n))] == []
    assert [v for v, pos in ner_pipeline.LEXICON.items() if pos == "VERB" and occurs(v, re.I)] == []
    source = open(ner_pipeline.__file__, encoding="utf-8").read()
    assert "shipped_text" not in source  # the shipped text's paragraphs are chunks of the set


def test_auto_finds_the_answering_chunks_with_a_trained_pipeline(nlp, documents):
    """Acceptance: on the issue's two examples and on >= 90 % of the realistic set's records, ``auto`` marks the
    answering chunk critical; the paper read literally (distinct question entities > 6) marks nothing."""
    auto = make_scorer("auto", nlp=nlp)
    assert (auto.name, auto.delta, auto.ratio, auto.threshold(None)) == ("terms", 2, 0.5, 1)
    result = evaluate(auto, documents)
    for example in EXAMPLES:
        scores, critical, answers = result["per_record"][example]
        assert set(answers) <= set(critical), (example, scores)
    assert result["answer_critical"] >= 0.9 and result["with_critical"] >= 0.95
    assert result["negative_sees_answer"] <= 0.05  # the instruction-unfollowing negative does not see the answer
    # the hallucination negative leaves the best-scored critical chunks out: it sees the whole answer only where a
    # lower-scored critical chunk is the answering one (6 of 64 measured)
    assert result["hallucination_sees_answer"] <= 0.15
    # general documents (no answer): measured 57 of 64 (bench/results/scorers.csv); the bar leaves 3 records of
    # margin, so a retrained pipeline (another spaCy) that moves a record or two does not fail it
    without = evaluate(auto, documents, with_answer=False)
    assert round(without["answer_critical"] * without["records"]) >= 54
    literal = evaluate(make_scorer("entities", nlp=nlp), documents)
    assert literal["with_critical"] == 0  # no real question names 7 entities


def test_release_scorer_runs_on_the_trained_tagger(nlp, documents):
    release = make_scorer("release", nlp=nlp)
    assert release.name == "release" and release.delta == 2 and release.ratio == 0
    assert evaluate(release, documents)["answer_critical"] >= 0.9


def test_terms_without_a_tagger_use_entities_and_content_words(trained_nlp_path):
    ner_only = spacy.load(trained_nlp_path, exclude=["morphologizer", "lemmatizer"])
    terms = make_scorer("auto", nlp=ner_only).terms
    assert {"ahab", "pequod", "commanded"} <= terms("Captain Ahab commanded the Pequod.")


def test_terms_without_a_lemmatizer_use_lower_cased_tokens(trained_nlp_path):
    """A tagger but no lemmatizer: nouns and verbs count as their lower-cased text; ``release`` is refused."""
    tagged_only = spacy.load(trained_nlp_path, exclude=["lemmatizer"])
    assert {"walked", "mill"} <= make_scorer("auto", nlp=tagged_only).terms("Tobias walked to the mill.")
    with pytest.raises(ValueError, match="a tagger and a lemmatizer"):
        make_scorer("release", nlp=tagged_only)


def test_the_builder_scores_with_a_pipeline_path_and_records_the_scorer_it_used(tmp_path, trained_nlp_path):
    """``--scorer auto --spacy-model PATH`` builds with ``terms`` on the trained pipeline; the manifest records the
    resolved scorer, so ``--scorer terms`` resumes that build and another resolved scorer (spaCy gone: words) is
    refused."""
    import dataclasses

    from test_builder import NEEDLE, echo_generate, raw_lines, read_raw_file_from

    from logo.data.builder import BuildOptions, build
    from logo.data.records import read_preference_file
    from logo.data.tokenizer import default_tokenizer
    from logo.errors import RunDirectoryError

    tokenizer = default_tokenizer()
    raw = read_raw_file_from(tmp_path, raw_lines()[:2])
    out = str(tmp_path / "o.jsonl")
    options = BuildOptions(chunk_tokens=48, context_chunks=6, scorer="auto", spacy_model=trained_nlp_path)
    counts = build(raw[:1], tokenizer, echo_generate, out, options, progress=False)
    assert (counts["scorer"], counts["delta"], counts["critical_ratio"], counts["built"]) == ("terms", 2, 0.5, 1)
    (record,) = read_preference_file(out, num_negatives=2)
    assert any(NEEDLE in chunk.replace("\n", " ") or "Bartholomew" in chunk for chunk in record.context)
    with pytest.raises(RunDirectoryError, match=r"--scorer: 'terms' -> 'words'"):
        build(raw, tokenizer, echo_generate, out, options, progress=False, scorer=make_scorer("words"))
    counts = build(raw, tokenizer, echo_generate, out, dataclasses.replace(options, scorer="terms"), progress=False)
    assert counts["already_built"] == 1 and counts["scorer"] == "terms"


def test_scorer_report_writes_its_tables(tmp_path, trained_nlp_path):
    from scorer_report import main

    main(["--spacy-model", trained_nlp_path, "--out", str(tmp_path / "scorers.csv")])
    table = (tmp_path / "scorers.md").read_text()
    assert "| terms | question + answer | 2 | 0.5 |" in table and "| entities | question | 6 |" in table and "moby-dick-1" in table
    assert (tmp_path / "scorers.csv").read_text().startswith("scorer,query,delta,ratio,records,")

"""How each chunk scorer of the data builder (``logo.data.importance``) finds the chunks that answer a question, on
the realistic set ``tests/data/realistic_qa.jsonl`` (64 questions over 10 public-domain documents, every chunk
that answers marked), with a *trained* spaCy pipeline.

    python bench/scorer_report.py                          # trains the test pipeline (tests/ner_pipeline.py) once
    python bench/scorer_report.py --spacy-model en_core_web_sm

Per scorer, with the builder's selection (N = 16 context chunks, at most N / 2 critical, the scorer's δ and ratio):
the share of records with >= 1 critical chunk, the share whose answering chunks are all critical, the share whose
best-scored chunk answers, the share of critical chunks that answer (precision), the mean number of critical chunks,
the share of records whose instruction-unfollowing negative (the lowest-scored chunks) sees an answering chunk,
and the share whose hallucination negative sees every answering chunk (it should not: the builder leaves the
best-scored critical chunks out of it); then again without the gold answer (records without one, general
documents' generated questions).
Writes bench/results/scorers.csv and scorers.md (``--out``: the CSV; the Markdown beside it).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import harness  # noqa: E402

from logo.data.builder import BuildOptions, prompt_chunks, select_chunks  # noqa: E402
from logo.data.importance import make_scorer  # noqa: E402

REALISTIC_SET = os.path.join(os.path.dirname(HERE), "tests", "data", "realistic_qa.jsonl")
SCORERS = ("terms", "release", "entities", "words")
#: the issue's two examples (ids of the realistic set)
EXAMPLES = ("moby-dick-1", "magazines-1")


def load_realistic_set(path: str = REALISTIC_SET) -> List[dict]:
    """The documents of the realistic set: ``{"doc", "source", "chunks", "questions": [{"id", "question",
    "answer", "answer_chunks"}]}``."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def evaluate(scorer, documents: List[dict], options: BuildOptions = None, with_answer: bool = True) -> Dict[str, object]:
    """The module doc's measures for one scorer, plus ``per_record``: id -> (scores, critical, answer chunks).
    ``with_answer=False`` scores as for a record without a gold answer (a general document's generated question)."""
    options = options or BuildOptions()
    scorer = dataclasses.replace(scorer, terms=functools.lru_cache(maxsize=None)(scorer.terms))  # chunks recur
    per_record, rows = {}, []
    for document in documents:
        for q in document["questions"]:
            scores = scorer.scores(document["chunks"], q["question"], q["answer"] if with_answer else None)
            delta = scorer.threshold(q["answer"] if with_answer else None)
            critical, irrelevant = select_chunks(scores, options, delta, scorer.ratio)
            _, unfollowing, hallucination = prompt_chunks(scores, critical, irrelevant)
            answers = set(q["answer_chunks"])
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))
            rows.append({"critical": bool(critical), "answered": answers <= set(critical), "best": best in answers,
                         "precision": len(answers & set(critical)) / len(critical) if critical else None,
                         "count": len(critical), "leak": bool(answers & set(unfollowing)),
                         "hallucination_leak": answers <= set(hallucination)})
            per_record[q["id"]] = (scores, critical, sorted(answers))
    with_critical = [r for r in rows if r["critical"]]
    share = lambda key, among=rows: round(sum(bool(r[key]) for r in among) / max(1, len(among)), 4)  # noqa: E731
    return {"scorer": scorer.name, "query": "question + answer" if with_answer and scorer.use_answer else "question",
            "delta": scorer.threshold("answer" if with_answer else None), "ratio": scorer.ratio, "records": len(rows),
            "with_critical": share("critical"), "answer_critical": share("answered"), "best_answers": share("best"),
            "precision": round(sum(r["precision"] for r in with_critical) / max(1, len(with_critical)), 4),
            "mean_critical": round(sum(r["count"] for r in with_critical) / max(1, len(with_critical)), 2),
            "negative_sees_answer": share("leak", with_critical),
            "hallucination_sees_answer": share("hallucination_leak", with_critical), "per_record": per_record}


def markdown(results: List[dict], pipeline: str) -> str:
    with_answer = results[:len(SCORERS)]
    lines = [f"Realistic set: {results[0]['records']} questions, pipeline: {pipeline}; N = 16, at most 8 critical.", "",
             "| scorer | query | δ | ratio | records with ≥ 1 critical | answering chunk critical | best chunk answers | "
             "critical chunks that answer | critical per record | unfollowing negative sees the answer | "
             "hallucination negative sees the answer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['scorer']} | {r['query']} | {r['delta']} | {r['ratio']} | {r['with_critical']:.0%} | "
                     f"{r['answer_critical']:.0%} | {r['best_answers']:.0%} | {r['precision']:.0%} | "
                     f"{r['mean_critical']} | {r['negative_sees_answer']:.0%} | {r['hallucination_sees_answer']:.0%} |")
    lines += ["", "The issue's examples: the answering chunk's score (critical?) per scorer.", "",
              "| question | " + " | ".join(r["scorer"] for r in with_answer) + " |",
              "| --- | " + " | ".join("---" for _ in with_answer) + " |"]
    for example in EXAMPLES:
        cells = []
        for r in with_answer:
            scores, critical, answers = r["per_record"][example]
            cells.append(", ".join(f"{scores[a]} ({'critical' if a in critical else 'not critical'})" for a in answers))
        lines.append(f"| {example} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacy-model", default=None,
                        help="a spaCy pipeline name or path (default: the test pipeline, trained once into --cache)")
    parser.add_argument("--cache", default=None,
                        help="where the trained test pipeline is kept (default: ~/.cache/logo-kernels)")
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "scorers.csv"))
    args = parser.parse_args(argv)
    if args.spacy_model is None:
        from ner_pipeline import cached_pipeline

        nlp, pipeline = cached_pipeline(args.cache), "the trained test pipeline (tests/ner_pipeline.py)"
    else:
        import spacy

        nlp, pipeline = spacy.load(args.spacy_model), args.spacy_model
    documents = load_realistic_set()
    scorers = [make_scorer(name, nlp=nlp) for name in SCORERS]
    results = [evaluate(scorer, documents) for scorer in scorers]
    results += [evaluate(scorer, documents, with_answer=False) for scorer in scorers if scorer.use_answer]
    text = markdown(results, pipeline)
    print(text)
    harness.write_csv([{k: v for k, v in r.items() if k != "per_record"} for r in results], args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    tmp = f"{md}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, md)
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()

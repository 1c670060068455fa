"""``python -m logo.eval {niah,ppl,harness}``: the paper's evaluations, runnable offline.

* :mod:`logo.eval.niah` — single-needle and multi-value needle-in-a-haystack over real context lengths x needle
  depths built from shipped public-domain text: exact match, recall score and (eager attention) retrieval score;
* :mod:`logo.eval.ppl` — perplexity per position bucket over long documents (paper Fig. 4);
* :mod:`logo.eval.harness` — a thin wrapper over lm-evaluation-harness for LongBench / RULER / MMLU-style tasks.

Every evaluation takes a Hugging Face model directory or a ``logo.train`` run directory (:mod:`logo.eval.loading`)
and writes JSON + CSV + a PNG into an output directory atomically (:mod:`logo.eval.outputs`).
"""

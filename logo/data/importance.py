"""Chunk importance for the data builder (paper §3.2.2, App. C): salient-term overlap with the question.

A chunk's score is the number of distinct salient terms it shares with the query; a chunk is critical when its
score is > δ (and, for ``terms``, at least ``ratio`` × the best chunk's score). The scorers:

* ``terms`` (what ``auto`` picks when a spaCy pipeline loads): the release's term set — named entities ∪ noun /
  proper-noun / verb lemmas (a token's lower-cased text where the pipeline has no lemmatizer; entities ∪ content
  words when it has no tagger) — the query being the question *and* the gold answer, stopwords dropped; δ = 2
  (>= 3 shared terms, the release's rule; 1 for a record without an answer, whose query has a term or two fewer)
  and ratio 0.5. An entity and the lemmas of its words are separate terms, as in the release: a chunk and a
  question both naming the entity "Herman Melville" share "herman melville", "herman" and "melville" (three terms
  for one name). This is how this package reads the
  paper's "score > δ = 6": a real question names two or three entities, so a distinct-entity overlap with the
  question never exceeds 6; the release's term set of question + answer is what tells the answering chunk apart
  (docs/data.md has the measurements).
* ``entities`` (the paper read literally): spaCy named entities of the chunk ∩ those of the question, δ = 6. On
  real questions it marks no chunk critical; kept by name for comparison.
* ``release`` (the authors' code, ``ImportanceScoring.py``): entities ∪ noun / proper-noun / verb lemmas of the
  question and the answer, as the release computes them; δ = 2, no ratio, no fallback without a tagger. Needs a
  pipeline with a tagger and lemmatizer (``en_core_web_sm`` / ``_lg``; the release used ``en_core_web_lg``).
* ``words`` (the fallback, no spaCy): lower-cased non-stopword words of >= 3 characters and numbers, the query
  being the question and the answer; δ = 1 (two shared content words).

``make_scorer("auto")`` picks ``terms`` when spaCy and an English pipeline load, else ``words`` (and says so).
A pipeline is a name (``en_core_web_sm``), a path, or a ready ``nlp`` object.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, List, Optional, Set

from ..errors import ConfigError

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also may might must shall upon us one two
said say says like get got make made many much every answer question document text following given please
""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+|\d+(?:[.,]\d+)*")

SCORERS = ("auto", "terms", "entities", "release", "words")
#: δ of each scorer: a chunk is critical when its score is > δ.
DEFAULT_DELTA = {"terms": 2, "entities": 6, "release": 2, "words": 1}
#: ratio of each scorer: a critical chunk also scores >= ratio × the best chunk's score.
DEFAULT_RATIO = {"terms": 0.5}


def salient_terms(text: str) -> Set[str]:
    """Lower-cased non-stopword words (>= 3 characters) and numbers of ``text``."""
    terms = set()
    for match in _WORD.finditer(text):
        word = match.group(0).lower().strip("'-")
        if word.isdigit() or (len(word) >= 3 and word not in STOPWORDS):
            terms.add(word)
    return terms


@lru_cache(maxsize=2)
def _spacy_pipeline(name: str):
    import spacy

    return spacy.load(name, disable=["parser"])


def entity_terms(doc) -> Set[str]:
    return {ent.text.lower() for ent in doc.ents}


def release_terms(doc) -> Set[str]:
    """Entities and noun / proper-noun / verb lemmas (the authors' ``ImportanceScoring.py``); a token without a
    lemma (a pipeline without a lemmatizer) counts as its lower-cased text."""
    return entity_terms(doc) | {(tok.lemma_ or tok.text).lower() for tok in doc
                                if tok.pos_ in ("NOUN", "PROPN", "VERB") and not tok.is_stop}


def tagged(nlp) -> bool:
    """Whether ``nlp`` assigns parts of speech (a tagger or a morphologizer)."""
    return "tagger" in nlp.pipe_names or "morphologizer" in nlp.pipe_names


def lemmatized(nlp) -> bool:
    """Whether ``nlp`` has a lemmatizer component (rule, lookup or trainable)."""
    return any("lemmatizer" in factory for factory in nlp.pipe_factories.values())


def query_terms(nlp) -> Callable[[str], Set[str]]:
    """The ``terms`` scorer's term set for ``nlp`` (module doc)."""
    if tagged(nlp):
        return lambda text: {t for t in release_terms(nlp(text)) if t not in STOPWORDS}
    return lambda text: entity_terms(nlp(text)) | salient_terms(text)


@dataclass
class Scorer:
    """scores(chunks, question, answer) -> [int]; ``delta`` and ``ratio`` are the scorer's default thresholds."""

    name: str
    terms: Callable[[str], Set[str]]
    use_answer: bool
    delta: int
    ratio: float = 0.0
    delta_without_answer: Optional[int] = None  # None: delta

    def threshold(self, answer: Optional[str] = None) -> int:
        """δ for a record with (or without) a gold answer: a query without the answer has fewer terms to share."""
        if answer or not self.use_answer or self.delta_without_answer is None:
            return self.delta
        return self.delta_without_answer

    def scores(self, chunks: Iterable[str], question: str, answer: Optional[str] = None) -> List[int]:
        query = self.terms(question) | (self.terms(answer) if answer and self.use_answer else set())
        return [len(self.terms(chunk) & query) for chunk in chunks]


def make_scorer(name: str = "auto", nlp=None, spacy_model: str = "en_core_web_sm", log=print) -> Scorer:
    """The scorer ``name`` (module doc); ``nlp`` is a spaCy pipeline (else ``spacy_model`` is loaded)."""
    if name not in SCORERS:
        raise ConfigError(f"--scorer must be one of {SCORERS}, got {name!r}")
    if name == "words":
        return Scorer("words", salient_terms, use_answer=True, delta=DEFAULT_DELTA["words"])
    if nlp is None:
        try:
            nlp = _spacy_pipeline(spacy_model)
        except Exception as error:  # spaCy missing, or the pipeline not installed
            if name == "auto":
                log(f"logo.data: spaCy pipeline {spacy_model!r} not available ({type(error).__name__}); scoring "
                    "chunks by word overlap (--scorer words)")
                return make_scorer("words")
            raise ConfigError(f"--scorer {name} needs spaCy and the {spacy_model!r} pipeline ({error}); install "
                              f"them (pip install 'logo-kernels[data]'; python -m spacy download {spacy_model}) or use "
                              "--scorer words") from None
    if name in ("auto", "terms"):
        return Scorer("terms", query_terms(nlp), use_answer=True, delta=DEFAULT_DELTA["terms"],
                      ratio=DEFAULT_RATIO["terms"], delta_without_answer=DEFAULT_DELTA["terms"] - 1)
    if name == "entities":
        return Scorer("entities", lambda text: entity_terms(nlp(text)), use_answer=False,
                      delta=DEFAULT_DELTA["entities"])
    if not (tagged(nlp) and lemmatized(nlp)):
        raise ConfigError("--scorer release needs a pipeline with a tagger and a lemmatizer (noun / verb lemmas), "
                          f"e.g. en_core_web_sm; {spacy_model!r} has {nlp.pipe_names}")
    return Scorer("release", lambda text: release_terms(nlp(text)), use_answer=True, delta=DEFAULT_DELTA["release"])


def chunk_scores(chunks: Iterable[str], question: str, answer: Optional[str] = None) -> List[int]:
    """Word-overlap importance of each chunk (the fallback scorer): |terms(chunk) ∩ terms(question + answer)|."""
    return make_scorer("words").scores(chunks, question, answer)

"""Chunk importance for the data builder (paper §3.2.2, App. C): salient-term overlap with the question.

The score of a chunk is the number of distinct salient terms it shares with the question (and the gold
answer when given). Salient terms are, by default, lower-cased word tokens that are not stopwords and
have >= 3 characters, plus numbers; with ``use_spacy=True`` (spaCy and a pipeline such as
``en_core_web_sm`` installed) they are the named entities and noun/verb lemmas, as in the authors' code.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, List, Optional, Set

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


def spacy_terms(text: str, model: str = "en_core_web_sm") -> Set[str]:
    """Named entities and noun/verb/proper-noun lemmas (the authors' salient terms); needs spaCy + model."""
    doc = _spacy_pipeline(model)(text)
    terms = {ent.text.lower() for ent in doc.ents}
    terms |= {tok.lemma_.lower() for tok in doc if tok.pos_ in ("NOUN", "PROPN", "VERB") and not tok.is_stop}
    return terms


def chunk_scores(chunks: Iterable[str], question: str, answer: Optional[str] = None, *,
                 use_spacy: bool = False, spacy_model: str = "en_core_web_sm") -> List[int]:
    """Importance of each chunk: |terms(chunk) ∩ terms(question [+ answer])|."""
    terms = (lambda t: spacy_terms(t, spacy_model)) if use_spacy else salient_terms
    query = terms(question) | (terms(answer) if answer else set())
    return [len(terms(chunk) & query) for chunk in chunks]


def spacy_available(model: str = "en_core_web_sm") -> bool:
    try:
        _spacy_pipeline(model)
        return True
    except Exception:
        return False

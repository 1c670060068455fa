"""A small *trained* English spaCy pipeline for the scorer tests and ``bench/scorer_report.py``: no pipeline can be
downloaded here, so one is trained offline, deterministically.

``train_pipeline(path)`` trains ``spacy.blank("en")`` + ``ner`` (PERSON, GPE, LOC, ORG, DATE, WORK_OF_ART, NORP, FAC)
+ ``morphologizer`` (universal POS) on sentences generated from templates written for this project, whose slots are
filled from name lists; a rule ``lemmatizer`` (English suffix rules written here) follows. The scores the tests check
come from that model's predictions. The pipeline is held out from the set it is measured on,
``tests/data/realistic_qa.jsonl``: it is trained on none of the set's text (not the shipped public-domain text,
whose paragraphs are chunks of the set), and no name of its lists and no verb of its templates occurs in the set's
questions or answers (``tests/test_scorers.py`` checks it). The set's documents do contain some of the list's
places (London, Boston, ...) and common nouns of the templates (ship, army, ...).

``cached_pipeline(directory)`` trains it once per version of this file and of spaCy and keeps it there.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from typing import Dict, List, Optional, Tuple

# -- the name lists the slots are filled from --------------------------------------------------------------------
FIRST = ("Thomas Anne Sarah Alice Emily Jane Samuel Harriet Walter Louisa Clara Frederick Martha Benjamin Eleanor "
         "Daniel Lucy Oliver Agnes Hugh Edith Nathaniel Florence Ralph Beatrice Isaac Rose Peter Helen Silas Dorothy Amos Grace").split()
LAST = ("Smith Brown Whitaker Hale Turner Fletcher Ashby Marlowe Pembroke Thornton Carver Ellison Hargreave Lindqvist "
        "Okafor Moreau Castellan Brandt Novak Fairfax Weston Holloway Radcliffe Sterling Dunmore Harwood Kingsley "
        "Prescott Vance Oakes Blackwood Merriweather Ransome Tolliver Garland Ashcombe Penhaligon Crowther").split()
SINGLE = "Esmeralda Tobias Ulric Cordelia Thaddeus Oriana Lysander Zebulon Perpetua Ignatius Wilhelmina".split()
GPE = ("London Boston Chicago Lisbon Vienna Madrid Dublin Edinburgh Baltimore Richmond Savannah Liverpool "
       "Bristol Hamburg Rome Naples Venice Zurich Brussels Amsterdam Moscow Warsaw Prague Cairo Calcutta Bombay "
       "Mexico France Spain Italy Germany Russia Poland Ireland Scotland England Portugal Egypt India China "
       "Brazil Peru Ohio Virginia Maryland Georgia Texas Vermont Maine Tennessee").split() + [
       "New Orleans", "San Francisco", "St. Louis", "the United States", "South Carolina"]
LOC = ["the Atlantic Ocean", "the Indian Ocean", "the Mediterranean", "the Rocky Mountains",
       "the Mississippi River", "the Thames", "the Rhine", "the Great Lakes", "the North Sea", "the Andes", "Lake Erie",
       "the Cape of Good Hope", "the Sahara", "the Black Sea", "the Danube", "Hudson Bay"]
ORG = ["the Royal Society", "the East India Company", "the Bank of England", "Harvard College", "Oxford University",
       "the University of Edinburgh", "the Hudson's Bay Company", "the Royal Navy", "the Senate", "the Supreme Court",
       "the Academy of Sciences", "the Baltimore and Ohio Railroad", "the Pennsylvania Railroad", "Lloyd's of London",
       "the British Museum", "the Smithsonian Institution", "Yale College", "the Geological Society", "the Post Office",
       "the Western Union Telegraph Company", "the Boston Athenaeum", "the Free Library"]
DATE = ["1750", "1776", "1801", "1812", "1827", "1833", "1848", "1854", "1860", "1871", "1880", "1899", "1905", "1912",
        "1920", "1936", "1947", "1958", "1963", "1977", "March 1799", "June 1815", "October 1846", "May 1882",
        "April 1906", "12 August 1819", "3 February 1867", "28 September 1921", "the spring of 1840",
        "the winter of 1857", "the summer of 1889", "1790 to 1795", "the 1850s", "the eighteenth century"]
WORK = ["The Pilgrim's Progress", "Paradise Lost", "Robinson Crusoe", "Gulliver's Travels", "The Odyssey", "Ivanhoe",
        "The Last of the Mohicans", "Vanity Fair", "Jane Eyre", "Wuthering Heights", "Great Expectations", "Middlemarch",
        "The Scarlet Letter", "Treasure Island", "Little Women", "The Count of Monte Cristo", "Don Quixote",
        "Emma", "Oliver Twist", "The Raven", "Leaves of Grass", "Walden", "The Moonstone", "Kidnapped"]
NORP = ("British German Spanish Italian Dutch Irish Scottish Russian Polish Portuguese Quaker Catholic "
        "Protestant Republican Democratic English Chinese Swiss").split()
FAC = ["Westminster Bridge", "the Tower of London", "Covent Garden", "Drury Lane", "the Brooklyn Bridge",
       "Independence Hall", "Faneuil Hall", "the Crystal Palace", "Fleet Street", "Union Square", "King's Cross"]

# -- the templates: every word's universal POS comes from LEXICON (default NOUN) -------------------------------------
TEMPLATES = """
In {DATE} , {PERSON} moved to {GPE} and studied law .
The captain of the ship was {PERSON} , a {NORP} sailor from {GPE} .
{WORK} was first printed in {GPE} by {ORG} .
{PERSON} worked for {ORG} for many years .
The {NORP} army crossed {LOC} in {DATE} .
The ship crossed {LOC} and reached {GPE} .
{PERSON} led the expedition to {LOC} .
{PERSON} told {PERSON} that the house in {GPE} was sold .
After the war {PERSON} returned to {GPE} .
{PERSON} lived on {FAC} with his sister .
In {DATE} the company moved its offices to {GPE} .
{PERSON} was elected president of {ORG} in {DATE} .
The railroad joined {GPE} and {GPE} in {DATE} .
{PERSON} discovered a new comet in {DATE} .
The museum in {GPE} bought the papers of {PERSON} .
{PERSON} was a {NORP} painter who worked in {GPE} .
Many {NORP} families settled near {LOC} .
{PERSON} and his wife spent the winter in {GPE} .
The newspaper was edited by {PERSON} from {DATE} .
{PERSON} asked {PERSON} to help him .
{PERSON} said that the river was deep .
They walked along {FAC} to the market .
A storm struck the coast of {GPE} in {DATE} .
{PERSON} taught at {ORG} .
The old house stood near {LOC} .
{PERSON} bought a farm in {GPE} .
{PERSON} painted a portrait of {PERSON} in {DATE} .
{PERSON} left {GPE} for {GPE} in {DATE} .
{PERSON} owned a small mill in {GPE} .
{ORG} opened a branch in {GPE} in {DATE} .
{PERSON} translated {WORK} into {NORP} .
{PERSON} and {PERSON} argued about {WORK} .
The {NORP} engineers mapped {LOC} in {DATE} .
{PERSON} practised medicine in {GPE} until {DATE} .
When did {PERSON} leave {GPE} ?
Who owned the mill near {FAC} ?
Who translated {WORK} ?
Where did {PERSON} live after {DATE} ?
What did {PERSON} find near {LOC} ?
""".strip().splitlines()

_WORDS = {
    "DET": "the a an this that these those every each his her their its no some many",
    "ADP": "in to from of by at for with on along near after into across during over under since until about",
    "PRON": "she he they it who him them her what which",
    "AUX": "was is were are has had have be been will would did does",
    "CCONJ": "and but or",
    "SCONJ": "that because",
    "PART": "to",
    "ADV": "first long where when how",
    "ADJ": "new old deep great long many small",
    "NUM": "one two three",
    "VERB": "moved studied printed worked crossed reached led told sold returned lived elected joined discovered "
            "bought asked help said walked struck taught stood spent settled edited painted live find left owned "
            "opened translated argued mapped practised leave",
}
LEXICON: Dict[str, str] = {}
for _pos, _words in _WORDS.items():
    for _w in _words.split():
        LEXICON.setdefault(_w, _pos)
for _p in ",.;:?":
    LEXICON[_p] = "PUNCT"

_FILLERS = {"GPE": GPE, "LOC": LOC, "ORG": ORG, "DATE": DATE, "WORK": WORK, "NORP": NORP, "FAC": FAC}
_LABEL = {"WORK": "WORK_OF_ART"}


def _person(rng: random.Random) -> List[str]:
    kind = rng.random()
    if kind < 0.5:
        return [rng.choice(FIRST), rng.choice(LAST)]
    if kind < 0.75:
        return [rng.choice(LAST)]
    return [rng.choice(SINGLE + FIRST)]


def _pos(word: str, in_entity: bool) -> str:
    if in_entity:
        if word.isdigit():
            return "NUM"
        if word in ("the", "of", "and", "'s"):
            return {"the": "DET", "of": "ADP", "and": "CCONJ", "'s": "PART"}[word]
        return "PROPN" if word[:1].isupper() else "NOUN"
    return LEXICON.get(word.lower()) or ("NUM" if word.isdigit() else "NOUN")


def template_examples(count: int, seed: int = 0) -> List[Tuple[List[str], List[str], List[str]]]:
    """(words, BILUO-free IOB entity tags as 'B-LABEL' / 'I-LABEL' / 'O', POS tags) for ``count`` sentences."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        template = rng.choice(TEMPLATES)
        words, ents, pos = [], [], []
        for token in template.split():
            slot = re.fullmatch(r"\{(\w+)\}", token)
            if slot is None:
                words.append(token if words else token[:1].upper() + token[1:])
                ents.append("O")
                pos.append(_pos(token, False))
                continue
            name = slot.group(1)
            filler = _person(rng) if name == "PERSON" else rng.choice(_FILLERS[name]).split()
            label = _LABEL.get(name, name)
            lead = filler[0] == "the" and label in ("GPE", "LOC", "ORG", "FAC")  # "the" stays outside the entity
            for k, word in enumerate(filler):
                words.append(word)
                pos.append(_pos(word, True))
                ents.append("O" if (lead and k == 0) else ("B-" if k == (1 if lead else 0) else "I-") + label)
        out.append((words, ents, pos))
    return out


# English suffix rules of the rule lemmatizer (written for this project): (suffix, replacement), tried in order.
LEMMA_RULES = {
    "noun": [["ies", "y"], ["ches", "ch"], ["shes", "sh"], ["sses", "ss"], ["xes", "x"], ["s", ""]],
    "verb": [["ied", "y"], ["ies", "y"], ["ing", ""], ["ed", ""], ["es", ""], ["s", ""]],
    "adj": [["er", ""], ["est", ""]],
}


# smaller than spaCy's defaults (width 96, depth 4): trains in seconds
_TOK2VEC = {"@architectures": "spacy.HashEmbedCNN.v2", "pretrained_vectors": None, "width": 64, "depth": 2,
            "embed_size": 2000, "window_size": 1, "maxout_pieces": 3, "subword_features": True}


def train_pipeline(path: Optional[str] = None, *, sentences: int = 1200, epochs: int = 8, seed: int = 0):
    """Trains the pipeline (module doc) and saves it to ``path`` when given; returns the ``nlp``. Deterministic for a
    seed."""
    import spacy
    from spacy.lookups import Lookups
    from spacy.tokens import Doc
    from spacy.training import Example
    from spacy.util import fix_random_seed, minibatch

    fix_random_seed(seed)
    nlp = spacy.blank("en")
    nlp.add_pipe("ner", config={"model": {"@architectures": "spacy.TransitionBasedParser.v2", "state_type": "ner",
                                          "extra_state_tokens": False, "hidden_width": 64, "maxout_pieces": 2,
                                          "use_upper": True, "nO": None, "tok2vec": _TOK2VEC}})
    nlp.add_pipe("morphologizer", config={"model": {"@architectures": "spacy.Tagger.v2", "nO": None,
                                                    "normalize": False, "tok2vec": _TOK2VEC}})
    examples = []
    for words, ents, pos in template_examples(sentences, seed):
        spaces = [i + 1 < len(words) and words[i + 1] not in ",.;:?" for i in range(len(words))]
        doc = Doc(nlp.vocab, words=words, spaces=spaces)
        gold = Doc(nlp.vocab, words=words, spaces=spaces, pos=pos, ents=ents)
        examples.append(Example(doc, gold))
    nlp.initialize(lambda: examples)
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(examples)
        for batch in minibatch(examples, size=32):
            nlp.update(batch, drop=0.2)
    lemmatizer = nlp.add_pipe("lemmatizer", config={"mode": "rule"})
    lookups = Lookups()
    lookups.add_table("lemma_rules", LEMMA_RULES)
    lookups.add_table("lemma_index", {})
    lookups.add_table("lemma_exc", {})
    lemmatizer.initialize(lookups=lookups)
    if path is not None:
        tmp = f"{path}.tmp-{os.getpid()}"
        nlp.to_disk(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process saved it first (a directory is not replaced): keep theirs
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return nlp


def cache_key() -> str:
    """A hash of this file's source and the spaCy version: a cached pipeline is retrained when either changes."""
    import spacy

    with open(__file__, "rb") as handle:
        source = handle.read()
    return hashlib.sha256(source + spacy.__version__.encode()).hexdigest()[:16]


def default_cache() -> str:
    """``$XDG_CACHE_HOME/logo-kernels`` (``~/.cache/logo-kernels``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "logo-kernels")


def cached_path(directory: Optional[str] = None) -> str:
    """The path of the trained pipeline under ``directory`` (default :func:`default_cache`), trained there first
    when this version is missing."""
    directory = directory or default_cache()
    path = os.path.join(directory, f"ner-pipeline-{cache_key()}")
    if not os.path.isdir(path):
        os.makedirs(directory, exist_ok=True)
        train_pipeline(path)
    return path


def cached_pipeline(directory: Optional[str] = None):
    """The loaded pipeline of :func:`cached_path`."""
    import spacy

    return spacy.load(cached_path(directory))

"""Embedded synthetic long-context preference tasks: multi-value key-value retrieval in a haystack.

Each sample hides ``num_keys`` keys in a stretch of the shipped public-domain text; every key has one or
more values (words), each in its own needle sentence at a random place::

    Remember this pair: lantern harvest.

and asks for all pairs of one key. The preference record it yields has

* chosen: the key's pairs in order of appearance, ``"Pairs: lantern harvest, lantern copper"``;
* rejected[0] (hallucination): the same format with the values of *another* key of the same context;
* rejected[1] (instruction unfollowing): a sentence copied from the context, ignoring the question.

``split="heldout"`` draws from a disjoint seed stream: same keys and text, other contexts and values.
Records are ordinary :class:`~logo.data.records.PreferenceRecord` objects (``context`` is one string), so
the default run writes them to JSONL and trains through the same path as user data.
"""
from __future__ import annotations

import random
import re
from typing import List

from .corpus import shipped_text
from .records import PreferenceRecord

KEYS = ("lantern", "compass", "harbour", "orchard", "violin", "glacier", "meadow", "falcon", "ledger", "quarry",
        "beacon", "thimble", "saddle", "kettle", "anchor", "willow", "marble", "cobalt", "ember", "garnet",
        "juniper", "parsnip", "pelican", "tundra")
VALUES = ("harvest", "copper", "thunder", "velvet", "saffron", "granite", "lagoon", "pepper", "cinder", "walnut",
          "harbor", "crystal", "mustard", "feather", "lantana", "orbit", "canyon", "biscuit", "tulip", "silver",
          "meteor", "pebble", "island", "ginger", "rocket", "maple", "cactus", "puzzle", "dolphin", "summit",
          "banjo", "trumpet", "coral", "nectar", "quartz", "bamboo", "cobble", "magnet", "ribbon", "tiger")
SYSTEM = "You answer questions about the document. Give every pair asked for, in order, and nothing else."
NEEDLE = "Remember this pair: {key} {value}."
QUESTION = "Which words are paired with {key}? Answer with every pair, in order."
SPLIT_SEEDS = {"train": 0, "heldout": 1_000_003}


def _sentences(text: str) -> List[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?;])\s+", text) if len(s.strip()) > 1]


def _answer(key: str, values: List[str]) -> str:
    # "Pairs:" first, so the key is tokenized as in the needles (after a space)
    return "Pairs: " + ", ".join(f"{key} {value}" for value in values)


def task_phrases() -> List[str]:
    """Phrases of the task, for training the embedded tokenizer (keys, digits, templates)."""
    rng = random.Random(7)
    phrases = [SYSTEM]
    for _ in range(8):  # repeated so that every key and value becomes one token
        for key in KEYS:
            phrases += [NEEDLE.format(key=key, value=rng.choice(VALUES)), QUESTION.format(key=key),
                        _answer(key, rng.sample(VALUES, 2))]
        phrases += [" ".join(VALUES)]
    return phrases


def make_kv_records(num_records: int, *, split: str = "train", seed: int = 0, context_words: int = 1000,
                    num_keys: int = 4, max_values_per_key: int = 2, text: str = None) -> List[PreferenceRecord]:
    """``num_records`` key-value retrieval preference records (module doc) with contexts of about
    ``context_words`` words of the shipped text (cycled when longer). Deterministic in (split, seed)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if not 2 <= num_keys <= len(KEYS):
        raise ValueError(f"num_keys must be in [2, {len(KEYS)}] (a hallucination needs another key), got {num_keys}")
    if num_keys * max_values_per_key > len(VALUES):
        raise ValueError(f"num_keys * max_values_per_key must be <= {len(VALUES)} (distinct values)")
    if max_values_per_key < 1 or context_words < 1 or num_records < 0:
        raise ValueError("max_values_per_key, context_words must be >= 1 and num_records >= 0")

    sentences = _sentences(text if text is not None else shipped_text())
    rng = random.Random(SPLIT_SEEDS[split] + seed * 7919)
    records = []
    for i in range(num_records):
        start, words, hay = rng.randrange(len(sentences)), 0, []
        while words < context_words:
            sentence = sentences[(start + len(hay)) % len(sentences)]
            hay.append(sentence)
            words += len(sentence.split())
        keys = rng.sample(KEYS, num_keys)
        values = rng.sample(VALUES, num_keys * max_values_per_key)
        needles = {}  # key -> its values in order of appearance
        gaps = range(len(hay) + 1)  # each key's first needle (several may share a gap in a very short context)
        slots = sorted(rng.sample(gaps, num_keys) if len(gaps) >= num_keys else rng.choices(gaps, k=num_keys))
        inserts = []
        for k, key in enumerate(keys):
            count = rng.randint(1, max_values_per_key)
            key_values = values[k * max_values_per_key:k * max_values_per_key + count]
            positions = sorted([slots[k]] + [rng.randrange(len(hay) + 1) for _ in range(count - 1)])
            inserts += [(pos, k, NEEDLE.format(key=key, value=v)) for pos, v in zip(positions, key_values)]
            needles[key] = key_values
        for pos, _, needle in sorted(inserts, key=lambda x: (x[0], x[1]), reverse=True):
            hay.insert(pos, needle)
        # values in order of appearance in the final text
        order = {needle: n for n, needle in enumerate(hay)}
        for key in keys:
            needles[key].sort(key=lambda v, key=key: order[NEEDLE.format(key=key, value=v)])
        asked, other = keys[0], keys[1 + rng.randrange(num_keys - 1)]
        distractor = rng.choice([s for s in hay if not s.startswith(NEEDLE.split(":")[0])])
        records.append(PreferenceRecord(
            id=f"kv-{split}-{seed}-{i}", context=(" ".join(hay),), question=QUESTION.format(key=asked),
            chosen=_answer(asked, needles[asked]), rejected=(_answer(asked, needles[other]), distractor),
            system=SYSTEM))
    return records

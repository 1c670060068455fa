"""``python -m logo.eval niah``: needle-in-a-haystack over real context lengths x needle depths.

The haystack is the shipped public-domain text (no download), cut to exactly ``length`` context tokens from a
seeded offset; needles are inserted at token offsets: the first at round(depth x haystack tokens), the others
(multi-value) spread evenly between it and the end. Two modes:

* ``single``: one key, one value;
* ``multi`` (the paper's multi-value NIAH): one key, ``--values`` values, each in its own needle.

Needle formats: ``ruler`` (RULER's "One of the special magic numbers for {key} is: {value}." with 7-digit values;
for real models) and ``kv`` (the synthetic task's "Remember this pair: {key} {value}."; for the embedded toy,
which knows only that format). The prompt goes through the model's chat template (:mod:`logo.data.encoding`).

Scores, per sample and averaged per (length, depth) cell:

* ``exact_match``: the greedy answer holds every needle value, in order, and (``kv``) nothing but the gold answer;
* ``recall`` (the paper's recall score): the share of needle values the answer contains;
* ``retrieval`` (with ``--retrieval-score``; needs eager attention): Wu et al. 2024's retrieval heads. A head
  retrieves at a generation step when the context token it attends to most is a needle-value token equal to the
  token generated; its score is |g_h ∩ k| / |k| (g_h: the value tokens it retrieved, k: all value tokens). The
  model's score: the mean over the 10 best heads of the per-head scores averaged over samples, heads below 0.1
  left out (0 when none remain).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..data.records import PreferenceRecord

RULER_KEYS = ("lighthouse", "orchard", "violin", "glacier", "harbour", "compass", "falcon", "meadow", "lantern",
              "marble", "quarry", "thimble", "saddle", "juniper", "pelican", "tundra")
FORMATS = {
    "ruler": dict(needle="One of the special magic numbers for {key} is: {value}.",
                  question="What are all the special magic numbers for {key} mentioned in the provided text?",
                  answer="{values}", system=None),
    "kv": dict(needle="Remember this pair: {key} {value}.",
               question="Which words are paired with {key}? Answer with every pair, in order.",
               answer="Pairs: {pairs}", system="synthetic"),
}
MODES = ("single", "multi")


@dataclass
class NiahOptions:
    lengths: Sequence[int] = (1024, 2048, 4096)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    modes: Sequence[str] = ("single", "multi")
    values: int = 4
    samples: int = 4
    format: str = "ruler"
    max_new_tokens: int = 64
    batch_size: int = 8
    retrieval_score: bool = False
    seed: int = 0

    def validate(self) -> "NiahOptions":
        from ..errors import ConfigError

        if not self.lengths or any(isinstance(x, bool) or not isinstance(x, int) or x < 16 for x in self.lengths):
            raise ConfigError(f"--lengths must be integers >= 16 (context tokens), got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"--depths must lie in [0, 1], got {list(self.depths)}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"--modes must be among {MODES}, got {list(self.modes)}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {tuple(FORMATS)}, got {self.format!r}")
        for name in ("values", "samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


@dataclass
class NiahCase:
    length: int
    depth: float
    mode: str
    key: str
    values: List[str]
    prompt: List[int]
    context_start: int  # token offset of the context inside the prompt
    context_end: int
    needle_starts: List[int] = field(default_factory=list)  # token offsets of the needles inside the prompt
    value_positions: List[int] = field(default_factory=list)  # prompt positions of the value tokens
    gold: str = ""


def _haystack_ids(tokenizer) -> List[int]:
    from ..data.corpus import shipped_text

    return list(tokenizer(shipped_text(), add_special_tokens=False)["input_ids"])


def _template(tokenizer, question: str, system: Optional[str]):
    """(head ids, tail ids) around a context, as training encodes a record."""
    from ..data.encoding import prompt_pieces

    head, _, tail, _ = prompt_pieces(tokenizer, PreferenceRecord("niah", ("x",), question, "x", ("x",), system))
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []  # noqa: E731
    return encode(head), encode(tail)


def _value_token_span(tokenizer, needle_ids: List[int], value: str) -> List[int]:
    """Offsets, inside a needle's ids, of the tokens that spell ``value`` (the last occurrence)."""
    for start in range(len(needle_ids) - 1, -1, -1):
        for end in range(start + 1, len(needle_ids) + 1):
            if tokenizer.decode(needle_ids[start:end]).strip().rstrip(".") == value:
                return list(range(start, end))
    return []


def build_case(tokenizer, haystack: List[int], length: int, depth: float, mode: str, options: NiahOptions,
               rng: random.Random) -> NiahCase:
    """One prompt of ``length`` context tokens with the needles at ``depth`` (module doc)."""
    fmt = FORMATS[options.format]
    if options.format == "kv":
        from ..data.synthetic import KEYS, VALUES

        key = rng.choice(KEYS)
        values = rng.sample(VALUES, 1 if mode == "single" else options.values)
    else:
        key = rng.choice(RULER_KEYS)
        values = [str(rng.randrange(10**6, 10**7)) for _ in range(1 if mode == "single" else options.values)]
    needles = [list(tokenizer(" " + fmt["needle"].format(key=key, value=v), add_special_tokens=False)["input_ids"])
               for v in values]
    filler_length = length - sum(len(n) for n in needles)
    if filler_length < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--lengths {length}: a context of {length} tokens cannot hold {len(needles)} needles "
                          f"({sum(len(n) for n in needles)} tokens); give longer --lengths or fewer --values")
    offset = rng.randrange(len(haystack))
    filler = [haystack[(offset + i) % len(haystack)] for i in range(filler_length)]
    first = round(depth * filler_length)
    starts = [first + round(j * (filler_length - first) / len(needles)) for j in range(len(needles))]
    context, value_positions, needle_starts, cursor = [], [], [], 0
    for start, needle, value in zip(starts, needles, values):
        context += filler[cursor:start]
        cursor = start
        needle_starts.append(len(context))
        value_positions += [len(context) + k for k in _value_token_span(tokenizer, needle, value)]
        context += needle
    context += filler[cursor:]
    system = fmt["system"]
    if system == "synthetic":  # the synthetic task's instructions: the embedded toy knows no other
        from ..data.synthetic import SYSTEM as system
    head, tail = _template(tokenizer, fmt["question"].format(key=key), system)
    shift = len(head)
    gold = fmt["answer"].format(values=", ".join(values), pairs=", ".join(f"{key} {v}" for v in values))
    return NiahCase(length, depth, mode, key, values, head + context + tail, shift, shift + len(context),
                    [s + shift for s in needle_starts], [p + shift for p in value_positions], gold)


def score_answer(case: NiahCase, answer: str, fmt: str) -> Dict[str, float]:
    """exact_match and recall of one generated answer (module doc)."""
    found = [v for v in case.values if re.search(rf"(?<![\w]){re.escape(v)}(?![\w])", answer)]
    recall = len(found) / len(case.values)
    positions = [answer.find(v) for v in case.values]
    in_order = all(p >= 0 for p in positions) and positions == sorted(positions)
    if fmt == "kv":
        exact = " ".join(answer.split()) == " ".join(case.gold.split())
    else:
        extra = set(re.findall(r"\d{7}", answer)) - set(case.values)
        exact = in_order and not extra
    return {"exact_match": float(exact), "recall": recall}


def retrieval_head_scores(attentions: List[torch.Tensor], generated: List[int], case: NiahCase,
                          prompt_ids: Sequence[int]) -> torch.Tensor:
    """Per-head retrieval scores [layers, heads] of one sample (module doc). ``attentions[step]`` is
    [layers, heads, prompt + step] — the attention of the token generated at ``step`` over everything before it."""
    values = set(case.value_positions)
    if not values or not attentions:
        return torch.zeros(0)
    layers, heads, _ = attentions[0].shape
    retrieved = [[set() for _ in range(heads)] for _ in range(layers)]
    for step, attention in enumerate(attentions):
        context = attention[:, :, case.context_start:case.context_end]
        top = context.argmax(dim=-1) + case.context_start  # [layers, heads]
        for layer in range(layers):
            for head in range(heads):
                position = int(top[layer, head])
                if position in values and prompt_ids[position] == generated[step]:
                    retrieved[layer][head].add(position)
    return torch.tensor([[len(r) / len(values) for r in row] for row in retrieved])


def model_retrieval_score(head_scores: torch.Tensor, top: int = 10, floor: float = 0.1) -> float:
    """The mean of the ``top`` best per-head scores at or above ``floor`` (0 when none)."""
    flat = head_scores.flatten()
    kept = flat[flat >= floor]
    if kept.numel() == 0:
        return 0.0
    return float(kept.sort(descending=True).values[:top].mean())


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: List[List[int]], max_new_tokens: int) -> List[List[int]]:
    """Greedy continuations, left-padded batch (the model's own positions)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [row[width:].tolist() for row in out.cpu()]


@torch.no_grad()
def _generate_with_attentions(model, tokenizer, prompt: List[int], max_new_tokens: int):
    """Greedy decoding with a KV cache; returns (tokens, per-step attentions [layers, heads, keys]) of the
    positions that predicted them."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    cache, tokens, attentions = DynamicCache(), [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        attentions.append(torch.stack([a[0, :, -1, :].float().cpu() for a in out.attentions]))
        tokens.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.tensor([[token]], device=device)
    return tokens, attentions


def run(model, tokenizer, options: NiahOptions, progress: bool = True) -> Dict:
    """Every (mode, length, depth) cell with ``options.samples`` samples; returns {"rows", "cells", "summary"}."""
    from tqdm.auto import tqdm

    options.validate()
    if options.retrieval_score and getattr(model.config, "_attn_implementation", "eager") != "eager":
        from ..errors import ConfigError

        raise ConfigError("--retrieval-score reads attention weights: load the model with --attn eager")
    haystack = _haystack_ids(tokenizer)
    rng = random.Random(options.seed)
    cases = [build_case(tokenizer, haystack, length, depth, mode, options, rng)
             for mode in options.modes for length in options.lengths for depth in options.depths
             for _ in range(options.samples)]
    rows, head_sums, head_count = [], None, 0
    bar = tqdm(total=len(cases), desc="niah", disable=not progress, dynamic_ncols=True)
    step = 1 if options.retrieval_score else options.batch_size
    for start in range(0, len(cases), step):
        batch = cases[start:start + step]
        if options.retrieval_score:
            tokens, attentions = _generate_with_attentions(model, tokenizer, batch[0].prompt, options.max_new_tokens)
            outputs = [tokens]
            scores = retrieval_head_scores(attentions, tokens, batch[0], batch[0].prompt)
            if scores.numel():
                head_sums = scores if head_sums is None else head_sums + scores
                head_count += 1
        else:
            outputs = _generate_batch(model, tokenizer, [c.prompt for c in batch], options.max_new_tokens)
        for case, generated in zip(batch, outputs):
            if tokenizer.eos_token_id in generated:
                generated = generated[:generated.index(tokenizer.eos_token_id)]
            answer = tokenizer.decode(generated, skip_special_tokens=True)
            rows.append({"mode": case.mode, "length": case.length, "depth": case.depth, "key": case.key,
                         "values": " ".join(case.values), "answer": answer.strip(),
                         **score_answer(case, answer, options.format)})
        bar.update(len(batch))
    bar.close()
    cells = aggregate(rows)
    summary = {mode: {"exact_match": _mean(r["exact_match"] for r in rows if r["mode"] == mode),
                      "recall": _mean(r["recall"] for r in rows if r["mode"] == mode)} for mode in options.modes}
    if options.retrieval_score and head_count:
        summary["retrieval_score"] = model_retrieval_score(head_sums / head_count)
    return {"options": asdict(options), "rows": rows, "cells": cells, "summary": summary}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def aggregate(rows: List[dict]) -> List[dict]:
    """Mean exact match and recall per (mode, length, depth) cell, and per (mode, length) over depths."""
    cells = {}
    for r in rows:
        for key in ((r["mode"], r["length"], r["depth"]), (r["mode"], r["length"], "all")):
            cells.setdefault(key, []).append(r)
    return [{"mode": m, "length": length, "depth": d, "samples": len(rs),
             "exact_match": _mean(r["exact_match"] for r in rs), "recall": _mean(r["recall"] for r in rs)}
            for (m, length, d), rs in cells.items()]


def heatmap(cells: List[dict], title: str = ""):
    """A recall heatmap (length x depth) per mode; returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({c["mode"] for c in cells})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mine = [c for c in cells if c["mode"] == mode and c["depth"] != "all"]
        lengths = sorted({c["length"] for c in mine})
        depths = sorted({c["depth"] for c in mine})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for c in mine:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["recall"]
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{title} {mode}-needle recall".strip(), fontsize=9)
        for (i, j), value in [((i, j), grid[i, j]) for i in range(len(depths)) for j in range(len(lengths))]:
            if not math.isnan(float(value)):
                ax.text(j, i, f"{float(value):.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return fig

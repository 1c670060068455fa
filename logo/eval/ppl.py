"""``python -m logo.eval ppl``: perplexity per position bucket over long documents (the paper's Fig. 4).

Documents come from ``--file`` (``.txt``: one document per file; ``.jsonl``: one ``{"text"}`` per line) or, by
default, from the shipped public-domain text, whose paragraphs are drawn in a seeded order and concatenated into
documents of the requested length. For each ``--length`` L, every document is cut into windows of L tokens and the
negative log-likelihood of each position is computed with the fused op (no [tokens x vocab] logits); the output
is exp(mean NLL) per bucket of ``--bucket`` positions — how well the model uses growing context — and over the
whole window.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import ConfigError, InputFileError, read_json_lines, read_text_lines


@dataclass
class PplOptions:
    lengths: Sequence[int] = (1024, 2048, 4096)
    bucket: int = 256
    documents: int = 4
    batch_size: int = 1
    seed: int = 0

    def validate(self) -> "PplOptions":
        if not self.lengths or any(isinstance(x, bool) or not isinstance(x, int) or x < 2 for x in self.lengths):
            raise ConfigError(f"--lengths must be integers >= 2, got {list(self.lengths)}")
        for name in ("bucket", "documents", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


def read_documents(path: str) -> List[str]:
    """Documents of a user file (module doc)."""
    if path.endswith(".jsonl"):
        docs = []
        for number, obj, bad in read_json_lines(path, "documents file"):
            if bad is not None:
                raise InputFileError(f"{path}:{number}: invalid JSON ({bad.msg})")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise InputFileError(f"{path}:{number}: text: must be a non-empty string")
            docs.append(obj["text"])
        return docs
    text = "".join(line for _, line in read_text_lines(path, "documents file"))
    if not text.strip():
        raise InputFileError(f"{path}: empty")
    return [text]


def _shipped_documents(tokenizer, count: int, length: int, seed: int) -> List[List[int]]:
    from ..data.corpus import shipped_text

    paragraphs = [p for p in shipped_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        ids: List[int] = []
        while len(ids) < length:
            ids += list(tokenizer("\n\n" + rng.choice(paragraphs), add_special_tokens=False)["input_ids"])
        docs.append(ids[:length])
    return docs


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL [rows, L - 1] of each next token, from the decoder's hidden states and the fused op."""
    import logo_kernels as lk
    from logo_kernels.integrations.hf import causal_lm_parts, decoder_hidden_states, effective_head

    hidden = decoder_hidden_states(model, ids)
    _, head, transform = causal_lm_parts(model)
    with effective_head(head) as (weight, bias):
        logp = lk.linear_logprobs(hidden[:, :-1], weight, ids[:, 1:], bias, softcap=transform.softcap,
                                  logit_scale=transform.logit_scale)
    return -logp


def run(model, tokenizer, options: PplOptions, documents: Optional[List[str]] = None, progress: bool = True) -> Dict:
    """Perplexity per (length, bucket) and per length; returns {"rows", "summary", "options"}."""
    from tqdm.auto import tqdm

    options.validate()
    device = next(model.parameters()).device
    rows, summary = [], {}
    for length in options.lengths:
        if documents is None:
            windows = _shipped_documents(tokenizer, options.documents, length, options.seed)
        else:
            windows = []
            for doc in documents:
                ids = list(tokenizer(doc, add_special_tokens=False)["input_ids"])
                windows += [ids[s:s + length] for s in range(0, len(ids) - length + 1, length)]
            windows = windows[:options.documents]
            if not windows:
                raise InputFileError(f"no document holds {length} tokens")
        sums = torch.zeros(length - 1, dtype=torch.float64)
        count = 0
        for start in tqdm(range(0, len(windows), options.batch_size), desc=f"ppl {length}", disable=not progress,
                          dynamic_ncols=True):
            batch = torch.tensor(windows[start:start + options.batch_size], device=device)
            sums += token_nll(model, batch).double().sum(0).cpu()
            count += batch.shape[0]
        per_position = sums / count
        for b in range(0, length - 1, options.bucket):
            chunk = per_position[b:b + options.bucket]
            rows.append({"length": length, "bucket_start": b + 1, "bucket_end": b + len(chunk),
                         "nll": float(chunk.mean()), "ppl": math.exp(float(chunk.mean())), "windows": count})
        summary[str(length)] = {"ppl": math.exp(float(per_position.mean())), "windows": count}
    return {"options": asdict(options), "rows": rows, "summary": summary}


def curve(rows: List[dict], title: str = ""):
    """Perplexity per position bucket, one line per window length (Fig. 4 style)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        ax.plot([r["bucket_end"] for r in mine], [r["ppl"] for r in mine], marker="o", label=f"window {length}")
    ax.set_xlabel("position (end of bucket)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{title} perplexity by position".strip(), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig

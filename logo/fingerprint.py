"""Content fingerprints of what a run reads, so ``--resume`` can tell a changed file under an unchanged path.

* Data files (training / evaluation JSONL, builder inputs) and small files (configs, tokenizer files, weight files
  up to :data:`FULL_HASH_BYTES`): size + SHA-256 of the whole content. Any edited byte — one reversed preference —
  changes it. SHA-256 (hardware-accelerated on current x86 and ARM CPUs) ran at 1.0 GB/s from the page cache on
  the 2-core AMD EPYC dev machine: about a second per GB of data.
* Weight files above :data:`FULL_HASH_BYTES` (the shards of a real model): size + SHA-256 of a fixed sample — the
  first and last MiB (the safetensors header: every tensor's name, dtype, shape and offset) and
  :data:`SAMPLE_BLOCKS` blocks of 64 KiB at evenly spaced offsets, about 18 MiB per shard. Other weights (another
  checkpoint, a further fine-tune, a re-quantisation) change every sampled block; an edit of a few bytes between
  samples is not caught, which is the price of not reading 16 GB on every resume.

A fingerprint is a JSON-able dict; :func:`differences` lists what changed between two of them.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional

FULL_HASH_BYTES = 1 << 30
SAMPLE_BLOCKS = 256
_BLOCK = 1 << 16
_EDGE = 1 << 20
_READ = 1 << 22

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def file_fingerprint(path: str, sampled_above: Optional[int] = None) -> Dict[str, object]:
    """{"size", "sha256", "scheme"} of one file: the whole content, or (``sampled_above`` bytes and larger) the
    sample of the module doc."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if sampled_above is None or size <= sampled_above:
            scheme = "full"
            for block in iter(lambda: handle.read(_READ), b""):
                digest.update(block)
        else:
            scheme = f"sampled-{SAMPLE_BLOCKS}"
            offsets = [0, max(0, size - _EDGE)] + [size * k // SAMPLE_BLOCKS for k in range(SAMPLE_BLOCKS)]
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(_EDGE if offset in (0, max(0, size - _EDGE)) else _BLOCK))
            digest.update(str(size).encode())
    return {"size": size, "sha256": digest.hexdigest(), "scheme": scheme}


def directory_fingerprint(path: str, names=(), suffixes=()) -> Dict[str, Dict[str, object]]:
    """{file name: fingerprint} of the files in ``path`` (not recursive) that are in ``names`` or end in one of
    ``suffixes``; weight files above :data:`FULL_HASH_BYTES` are sampled."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or not (name in names or name.endswith(tuple(suffixes))):
            continue
        weights = name.endswith(WEIGHT_SUFFIXES)
        out[name] = file_fingerprint(full, FULL_HASH_BYTES if weights else None)
    return out


def model_fingerprint(path: str) -> Dict[str, Dict[str, object]]:
    """The model directory's config, weight index and weights."""
    return directory_fingerprint(path, MODEL_FILES, WEIGHT_SUFFIXES + (".index.json",))


def tokenizer_fingerprint(path: str) -> Dict[str, Dict[str, object]]:
    return directory_fingerprint(path, TOKENIZER_FILES)


def differences(saved: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """Lines naming what differs between two {item: fingerprint or {file: fingerprint}} maps, items saved only."""
    lines = []
    for item, old in saved.items():
        new = current.get(item)
        if new is None or old == new:
            continue
        if "sha256" in old:  # one file
            lines.append(f"{item}: content changed ({_describe(old, new)})")
            continue
        for name in sorted(set(old) | set(new)):
            if name not in new:
                lines.append(f"{item}: {name} was removed")
            elif name not in old:
                lines.append(f"{item}: {name} was added")
            elif old[name] != new[name]:
                lines.append(f"{item}: {name} changed ({_describe(old[name], new[name])})")
    return lines


def _describe(old: dict, new: dict) -> str:
    sizes = f"{old['size']:,} -> {new['size']:,} bytes" if old["size"] != new["size"] else f"{new['size']:,} bytes"
    return f"{sizes}, sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}"

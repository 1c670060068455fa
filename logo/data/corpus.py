"""The public-domain text shipped with the package (``assets/haystack.txt``; sources in ``assets/README.md``):
the embedded tokenizer's training corpus, the synthetic tasks' filler, the NIAH haystack and the default
perplexity documents."""
from __future__ import annotations

from importlib import resources


def shipped_text() -> str:
    """The whole shipped text (UTF-8)."""
    return resources.files("logo.data").joinpath("assets/haystack.txt").read_text(encoding="utf-8")

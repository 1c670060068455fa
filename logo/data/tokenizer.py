"""The embedded offline tokenizer: byte-level BPE trained on the shipped text, saved in Hugging Face format.

No tokenizer can be downloaded on the machines this project targets, so the embedded default run (and the
tests) train one in milliseconds with ``tokenizers`` on ``assets/haystack.txt`` plus the phrases of the
synthetic tasks. It is a :class:`transformers.PreTrainedTokenizerFast` with a chat template::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n

``<|end|>`` is the end-of-turn (eos) token, ``<|pad|>`` the padding token. Byte-level BPE encodes any
text, so a record outside the training corpus never fails to tokenize. Training is deterministic: the
same corpus gives the same vocabulary on every machine.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from .corpus import shipped_text
from .synthetic import task_phrases

SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], *, vocab_size: int = 1024, save_dir: Optional[str] = None):
    """Trains a byte-level BPE tokenizer on ``corpus`` and wraps it for transformers (chat template,
    eos ``<|end|>``, pad ``<|pad|>``). Saves it with ``save_pretrained`` when ``save_dir`` is given.
    Small corpora give fewer merges than ``vocab_size``: size a model's vocabulary with ``len(tokenizer)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|pad|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def default_tokenizer(save_dir: Optional[str] = None, vocab_size: int = 1024):
    """The embedded default: BPE over the shipped text and the synthetic tasks' phrases."""

    text = shipped_text()
    corpus = [line for line in text.splitlines() if line.strip()] + task_phrases()
    return build_tokenizer(corpus, vocab_size=vocab_size, save_dir=save_dir)

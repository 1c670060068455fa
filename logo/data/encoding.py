"""Preference records -> token ids: the prompt split into head | context | tail, and the responses.

With a chat template (``tokenizer.chat_template``) the prompt is the rendering of
``[system?, user: context + "\\n\\n" + question]`` with the generation prompt, and a response is what the
template puts after that prompt for an assistant turn, up to and including the end-of-turn token.
Templates that refuse a system role get the system text prepended to the user turn.
Without a chat template the documented plain template is used::

    [bos]{system}\\n\\n{context}\\n\\nQuestion: {question}\\nAnswer: {response}{eos}

The context is tokenized on its own (not through the rendered string) so its token span is known:
positional indices synthesis moves only the context chunks; the head (template start, system prompt)
keeps positions 0.., the tail (question, generation prompt) and the responses follow the context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .records import PreferenceRecord

_CONTEXT_MARK = "\x00LOGO_CONTEXT\x00"
_RESPONSE_MARK = "\x00LOGO_RESPONSE\x00"


@dataclass
class EncodedExample:
    """Token ids of one record: prompt = head + context + tail; responses[0] chosen, then the rejected.

    ``context_chunks``: the token lengths of the record's own chunks when its context is a list of several
    (the builder's chunks, the ones it scored); None for a single context string, which is cut every
    ``chunk_tokens`` tokens instead."""

    id: str
    head: List[int]
    context: List[int]
    tail: List[int]
    responses: List[List[int]]
    context_chunks: Optional[List[int]] = None

    @property
    def prompt(self) -> List[int]:
        return self.head + self.context + self.tail

    def chunk_lengths(self, chunk_tokens: int) -> List[int]:
        """The record's own chunk lengths, or the context cut into chunks of ``chunk_tokens`` (the last shorter)."""
        if self.context_chunks is not None:
            return list(self.context_chunks)
        n = len(self.context)
        return [min(chunk_tokens, n - s) for s in range(0, n, chunk_tokens)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _chat_messages(tokenizer, record: PreferenceRecord, user: str) -> list:
    if not record.system:
        return [{"role": "user", "content": user}]
    with_system = [{"role": "system", "content": record.system}, {"role": "user", "content": user}]
    try:
        _render(tokenizer, with_system, add_generation_prompt=True)
        return with_system
    except Exception:  # templates without a system role (e.g. Mistral's) raise
        return [{"role": "user", "content": f"{record.system}\n\n{user}"}]


def prompt_pieces(tokenizer, record: PreferenceRecord) -> Tuple[str, str, str, Tuple[str, str]]:
    """(head text, context text, tail text, (text before, text after) a response)."""
    context = "\n\n".join(record.context)
    if getattr(tokenizer, "chat_template", None):
        messages = _chat_messages(tokenizer, record, f"{_CONTEXT_MARK}\n\n{record.question}")
        prompt = _render(tokenizer, messages, add_generation_prompt=True)
        head, tail = prompt.split(_CONTEXT_MARK)
        full = _render(tokenizer, messages + [{"role": "assistant", "content": _RESPONSE_MARK}])
        reply = full[len(prompt):] if full.startswith(prompt) else None
        if reply is None or _RESPONSE_MARK not in reply:
            raise ValueError("the tokenizer's chat template does not render an assistant turn after its generation "
                             "prompt; pass use_chat_template=False to use the plain template")
        before, after = reply.split(_RESPONSE_MARK)
        eos = tokenizer.eos_token
        if eos and eos in after:  # stop at the end-of-turn token: what follows it is never generated
            after = after[:after.index(eos) + len(eos)]
        return head, context, tail, (before, after)
    bos = (tokenizer.bos_token or "") if getattr(tokenizer, "bos_token_id", None) is not None else ""
    head = bos + (f"{record.system}\n\n" if record.system else "")
    return head, context, f"\n\nQuestion: {record.question}\nAnswer:", (" ", tokenizer.eos_token or "")


def _truncate_middle(ids: List[int], limit: Optional[int], chunks: Optional[List[int]] = None):
    """(ids cut in the middle to ``limit``, the chunk lengths cut accordingly: empty chunks dropped)."""
    if limit is None or len(ids) <= limit:
        return ids, chunks
    keep_head = limit // 2
    cut_from, cut_to = keep_head, len(ids) - (limit - keep_head)
    if chunks is not None:
        kept, start = [], 0
        for length in chunks:
            end = start + length
            remaining = length - max(0, min(end, cut_to) - max(start, cut_from))
            if remaining > 0:
                kept.append(remaining)
            start = end
        chunks = kept
    return ids[:cut_from] + ids[cut_to:], chunks


def _context_ids(tokenizer, chunks: Sequence[str]):
    """(context ids, chunk lengths or None): one chunk tokenized at a time when there are several, each but the
    last ending with the "\n\n" that joins them in the rendered prompt."""
    if len(chunks) == 1:
        return _ids(tokenizer, chunks[0]), None
    pieces = [_ids(tokenizer, chunk + ("\n\n" if i < len(chunks) - 1 else "")) for i, chunk in enumerate(chunks)]
    return [t for piece in pieces for t in piece], [len(piece) for piece in pieces if piece]


def encode_record(record: PreferenceRecord, tokenizer, *, num_negatives: Optional[int] = None,
                  use_chat_template: bool = True, max_context_tokens: Optional[int] = None,
                  max_response_tokens: Optional[int] = None) -> EncodedExample:
    """Token ids of a record (module doc). Keeps the first ``num_negatives`` rejected responses (all when
    None); cuts the context in the middle to ``max_context_tokens`` and responses at
    ``max_response_tokens`` (a cut response loses its end-of-turn token)."""
    if not use_chat_template and getattr(tokenizer, "chat_template", None):
        tokenizer = _PlainView(tokenizer)
    head, context, tail, (reply_before, reply_after) = prompt_pieces(tokenizer, record)
    rejected = record.rejected if num_negatives is None else record.rejected[:num_negatives]
    if num_negatives is not None and len(rejected) < num_negatives:
        raise ValueError(f"record {record.id!r}: {len(rejected)} rejected responses, need {num_negatives}")
    responses = []
    for text in (record.chosen, *rejected):
        ids = _ids(tokenizer, reply_before + text + reply_after)
        responses.append(ids if max_response_tokens is None else ids[:max_response_tokens])
    if any(not r for r in responses):
        raise ValueError(f"record {record.id!r}: a response encodes to no tokens")
    context_ids, chunk_lengths = _context_ids(tokenizer, record.context)
    context_ids, chunk_lengths = _truncate_middle(context_ids, max_context_tokens, chunk_lengths)
    return EncodedExample(str(record.id), _ids(tokenizer, head), context_ids, _ids(tokenizer, tail), responses,
                          chunk_lengths)


def encode_prompt(record: PreferenceRecord, tokenizer, **kwargs) -> List[int]:
    """Prompt ids only (for generation): head + context + tail."""
    return encode_record(record, tokenizer, num_negatives=0, **kwargs).prompt


class _PlainView:
    """A tokenizer seen without its chat template (forces the plain template)."""

    chat_template = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def encode_records(records: Sequence[PreferenceRecord], tokenizer, **kwargs) -> List[EncodedExample]:
    return [encode_record(r, tokenizer, **kwargs) for r in records]

"""The LOGO data builder: long-context QA records (and question-less documents) -> preference records generated
by the policy model.

    python -m logo.data build --input raw.jsonl --model PATH --out prefs.jsonl [--general-docs docs.jsonl]

QA input lines are ``{"id", "context": str | [str], "question", "answer"?}``; general documents (the paper's
anti-forgetting share: ~2,000 RedPajama documents next to ~4,000 long QA) are ``{"id", "text"}``. Per record
(paper §3.2.2, App. C):

1. the context is tokenized with the model's tokenizer and cut into chunks of ``--chunk-tokens`` (512);
2. each chunk is scored by salient-term overlap with the question and answer (:mod:`logo.data.importance`: by
   default spaCy named entities ∪ noun / verb lemmas, the release's term set, δ = 2; the paper's literal entity
   overlap with the question, δ = 6, by name; word overlap as the fallback without spaCy);
3. with N = ``--context-chunks`` (16, the chunks the training context holds): the critical chunks are the
   highest-scored ones with score > δ and >= ``--critical-ratio`` × the best score, at most ``--max-critical``
   (N / 2); the irrelevant ones are the N minus that many lowest-scored chunks. A record without a critical or an
   irrelevant chunk is skipped (counted);
4. the policy model answers three prompts (sampling, T = 0.7, top-p 0.95, top-k 50; batched ``generate``
   in-process, or an OpenAI-compatible server with ``--endpoint``, :mod:`logo.data.endpoint`):
   chosen = pi(Q, critical), rejected[0] = pi(Q, irrelevant) (instruction unfollowing: as many irrelevant
   chunks as critical ones), rejected[1] = pi(Q, the lower-scored half of the critical chunks + irrelevant ones)
   (hallucination: the paper's mix of critical and irrelevant chunks, the best critical chunks left out, so
   it never sees them all; with one critical chunk, irrelevant ones only — :func:`prompt_chunks`);
5. degenerate samples are dropped (an empty response, a rejected identical to the chosen; counted);
6. the record's context is the list of those N chunks in their original order — the very chunks training later
   dresses in synthesized positions (one chunking, carried through the record).

A general document first gets a question: the model is prompted with one of its chunks (``QUESTION_PROMPT``) and
the first line of its answer ending in "?" is the question (documents without one are skipped, counted); it is
then built like a QA record whose answer is unknown.

Finished records are appended to ``<out>.partial`` (flushed and fsynced per batch), so a build killed at any
point — before its first batch, or in the middle of a line — resumes where it stopped (ids already built are
skipped, a torn last line is cut); the final file is validated and renamed into place. A run in which every
record is skipped or dropped writes nothing and says why. Bad input lines are reported as ``file:line: field``.

One build per ``--out``: the command holds an OS lock (``.<out>.lock`` beside it, :mod:`logo.run_lock`) while it
runs, and a second build into the same ``--out`` is refused naming the holder. ``<out>.build.json`` records a
hash of every input record (``--input`` and ``--general-docs``), the content fingerprints of the model and its
tokenizer (:mod:`logo.fingerprint`), the options (the scorer as resolved: ``auto`` that found spaCy is ``terms``)
and the generator (in-process, or the endpoint's model name and prompt format; not its URL). Resuming (a
``.partial`` or an ``--out`` already there) is refused, listing what changed, when a record already built changed
or left the input, the model or tokenizer changed, or an option or the generator did (``--batch-size`` may
change); new input records are simply built. A failed write (no space left, ...) exits with code 4 naming the path
and how many records are safe in the ``.partial``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, InputFileError, RunDirectoryError, ServiceError, read_json_lines, run_cli, writing
from ..files import write_json_atomically
from .endpoint import PROMPT_FORMATS, EndpointOptions, endpoint_generator, name_record
from .importance import SCORERS, Scorer, make_scorer
from .records import PreferenceRecord, read_preference_file

QUESTION_PROMPT = ("Read the passage and ask one question that the passage answers. Write only the question.\n\n"
                   "Passage:\n{passage}")


@dataclass
class BuildOptions:
    chunk_tokens: int = 512
    context_chunks: int = 16
    max_critical: Optional[int] = None  # None: context_chunks // 2
    delta: Optional[int] = None  # None: the scorer's (terms 2 / 1 without an answer, entities 6, release 2, words 1)
    critical_ratio: Optional[float] = None  # None: the scorer's (terms 0.5, else 0)
    scorer: str = "auto"
    spacy_model: str = "en_core_web_sm"
    batch_size: int = 4
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50  # transformers' generate default, sent to a server too (0: off)
    seed: int = 0
    system: Optional[str] = None

    def validate(self) -> "BuildOptions":
        for name in ("chunk_tokens", "context_chunks", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.context_chunks < 2:
            raise ConfigError("--context-chunks must be >= 2 (critical and irrelevant chunks)")
        if self.max_critical is not None and not 1 <= self.max_critical < self.context_chunks:
            raise ConfigError(f"--max-critical must be in [1, context_chunks), got {self.max_critical}")
        if self.delta is not None and (isinstance(self.delta, bool) or not isinstance(self.delta, int) or self.delta < 0):
            raise ConfigError(f"--delta must be an integer >= 0, got {self.delta!r}")
        if self.critical_ratio is not None and not 0 <= self.critical_ratio <= 1:
            raise ConfigError(f"--critical-ratio must be in [0, 1], got {self.critical_ratio}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"--scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not 0 <= self.temperature <= 10:
            raise ConfigError(f"--temperature must be in [0, 10] (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0 (0: off), got {self.top_k!r}")
        return self

    @property
    def critical_limit(self) -> int:
        return self.max_critical if self.max_critical is not None else max(1, self.context_chunks // 2)


@dataclass
class RawRecord:
    id: str
    context: str
    question: Optional[str]
    answer: Optional[str]
    kind: str = "qa"  # "qa" | "general" (a document whose question is generated)


def _read_jsonl(path: str, what: str, required: Tuple[str, ...], text_fields: Tuple[str, ...], build,
                one_of: Tuple[str, ...] = ()) -> list:
    records, errors, seen = [], [], set()
    for number, obj, bad in read_json_lines(path, what):
        where = f"{path}:{number}"
        if bad is not None:
            errors.append(f"{where}: record: invalid JSON ({bad.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: record: must be a JSON object")
            continue
        problems = [f"{where}: {name}: missing" for name in required if name not in obj]
        if one_of and not any(name in obj for name in one_of):
            problems.append(f"{where}: {one_of[0]}: missing")
        for name in text_fields:
            value = obj.get(name)
            if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
                value = "\n\n".join(value)
            if name in obj and not (isinstance(value, str) and value.strip()):
                problems.append(f"{where}: {name}: must be a non-empty string" + (
                    " or list of strings" if name in ("context", "text") else ""))
        if obj.get("answer") is not None and not isinstance(obj["answer"], str):
            problems.append(f"{where}: answer: must be a string when given")
        if "id" in obj and (not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool)):
            problems.append(f"{where}: id: must be a string or an int")
        elif "id" in obj and str(obj["id"]) in seen:
            problems.append(f"{where}: id: duplicate id {obj['id']!r}")
        if problems:
            errors += problems
            continue
        seen.add(str(obj["id"]))
        records.append(build(obj))
    if errors:
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise InputFileError(f"{path}: {len(errors)} invalid field(s):\n" + "\n".join(errors[:50]) + more)
    return records


def _text(value) -> str:
    return "\n\n".join(value) if isinstance(value, list) else value


def read_raw_file(path: str) -> List[RawRecord]:
    """QA records; raises InputFileError listing ``file:line: field: message`` for every bad line."""
    return _read_jsonl(path, "raw QA file", ("id", "context", "question"), ("context", "question"),
                       lambda o: RawRecord(str(o["id"]), _text(o["context"]), o["question"], o.get("answer")))


def read_general_docs(path: str) -> List[RawRecord]:
    """Question-less documents ``{"id", "text"}`` (``context`` accepted too); ids get a ``general-`` prefix."""
    def build(o):
        return RawRecord(f"general-{o['id']}", _text(o.get("text", o.get("context"))), None, None, kind="general")

    return _read_jsonl(path, "general documents file", ("id",), ("text", "context"), build, one_of=("text", "context"))


def split_chunks(tokenizer, text: str, chunk_tokens: int) -> List[str]:
    """The text cut into consecutive pieces of ``chunk_tokens`` tokens (decoded back to text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[s:s + chunk_tokens]) for s in range(0, len(ids), chunk_tokens)]


def select_chunks(scores: Sequence[int], options: BuildOptions, delta: int,
                  ratio: float = 0.0) -> Tuple[List[int], List[int]]:
    """(critical chunk indices, irrelevant chunk indices lowest-scored first), per step 3 of the module doc."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    best = scores[ranked[0]] if ranked else 0
    critical = [i for i in ranked[:options.critical_limit] if scores[i] > delta and scores[i] >= ratio * best]
    room = min(options.context_chunks, len(scores)) - len(critical)
    irrelevant = sorted((i for i in range(len(scores)) if i not in critical), key=lambda i: (scores[i], i))[:room]
    return sorted(critical), irrelevant


def prompt_chunks(scores: Sequence[int], critical: Sequence[int],
                  irrelevant: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
    """The chunk indices (in original order) of the three generation contexts: chosen = the critical chunks;
    instruction unfollowing = as many irrelevant chunks (the lowest-scored); hallucination = the lowest-scored
    half (floor) of the critical chunks, the highest-scored dropped, filled up to as many chunks with irrelevant
    ones, the next-lowest first. With one critical chunk the hallucination context holds none (only irrelevant
    chunks other than the unfollowing one's, where there are any): it never holds every critical chunk."""
    k = len(critical)
    ranked = sorted(critical, key=lambda i: (-scores[i], i))  # select_chunks' order: best first
    kept = ranked[k - k // 2:]
    others = list(irrelevant[k:]) + list(irrelevant[:k])  # the unfollowing context's chunks last
    return sorted(critical), sorted(irrelevant[:k]), sorted(kept + others[:k - len(kept)])


@dataclass
class Plan:
    """The three generation contexts and the training context of one record (chunk indices)."""

    record: RawRecord
    chunks: List[str]
    critical: List[int]
    irrelevant: List[int]  # lowest-scored first
    scores: Sequence[int]

    def prompts(self) -> List[List[str]]:
        return [[self.chunks[i] for i in indices]
                for indices in prompt_chunks(self.scores, self.critical, self.irrelevant)]

    def training_context(self) -> List[str]:
        return [self.chunks[i] for i in sorted(set(self.critical) | set(self.irrelevant))]


def hf_generator(model, tokenizer, options: BuildOptions) -> Callable[[List[List[int]]], List[str]]:
    """Batched sampling with ``model.generate`` (left padding; greedy at temperature 0); returns the decoded
    continuations and counts the tokens generated in ``.tokens``."""
    import torch

    sampling = (dict(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
                if options.temperature > 0 else dict(do_sample=False))

    def generate(prompts: List[List[int]]) -> List[str]:
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **sampling,
                                 max_new_tokens=options.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id).cpu()
        generate.tokens += int((out[:, width:] != pad).sum())
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    generate.tokens = 0
    return generate


def _casefolded_words(text: str) -> str:
    return " ".join(text.split()).lower()


def degenerate(chosen: str, rejected: Sequence[str]) -> Optional[str]:
    """Why a generated sample must be dropped, or None."""
    if not chosen.strip() or any(not r.strip() for r in rejected):
        return "empty response"
    if any(_casefolded_words(r) == _casefolded_words(chosen) for r in rejected):
        return "a rejected response equals the chosen one"
    return None


def first_question(text: str) -> Optional[str]:
    """The first line of a generated text that is a question (ends with "?"), or None."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line.endswith("?") and len(line) > 3:
            return line
    return None


def _user_prompt(tokenizer, text: str, system: Optional[str]) -> List[int]:
    from .encoding import encode_prompt

    stub = PreferenceRecord("q", (text,), " ", "x", ("x",), system)
    return encode_prompt(stub, tokenizer)


def generate_questions(docs: Sequence[RawRecord], tokenizer, generate, options: BuildOptions,
                       counts: Dict[str, int]) -> List[RawRecord]:
    """Asks the model one question about the middle chunk of each document (module doc); drops documents without
    one (``counts["skipped_no_question"]``)."""
    out = []
    for start in range(0, len(docs), options.batch_size):
        batch = docs[start:start + options.batch_size]
        prompts = []
        for doc in batch:
            chunks = split_chunks(tokenizer, doc.context, options.chunk_tokens)
            prompts.append(_user_prompt(tokenizer, QUESTION_PROMPT.format(passage=chunks[len(chunks) // 2]),
                                        options.system))
        for doc, text in zip(batch, _generate(generate, prompts, [doc.id for doc in batch])):
            question = first_question(text)
            if question is None:
                counts["skipped_no_question"] += 1
                continue
            out.append(RawRecord(doc.id, doc.context, question, None, kind="general"))
    return out


def _generate(generate, prompts: List[List[int]], owners: List[str]) -> List[str]:
    """``generate(prompts)``; an error about one prompt names its record (``owners``: a record id per prompt)."""
    try:
        return generate(prompts)
    except (ConfigError, ServiceError) as error:
        raise name_record(error, prompts, owners) from None


def build(raw: Sequence[RawRecord], tokenizer, generate: Callable[[List[List[int]]], List[str]], out_path: str,
          options: BuildOptions, progress: bool = True, scorer: Optional[Scorer] = None,
          general: Sequence[RawRecord] = (), provenance: Optional[dict] = None,
          generator: Optional[dict] = None) -> Dict[str, int]:
    """Builds preference records for ``raw`` (and the ``general`` documents) into ``out_path`` (module doc);
    returns the counts. ``generate`` is any callable: token-id prompts -> texts (HF generate, vLLM, a server);
    ``generator`` says which (default ``{"generator": "in-process"}``; :func:`generator_options`).
    ``provenance`` (fingerprints of the model and tokenizer), the options, the generator and the records' hashes
    are checked against ``<out>.build.json`` when resuming, then written there."""
    from tqdm.auto import tqdm

    from .encoding import encode_prompt
    from .records import write_preference_file

    options.validate()
    scorer = scorer or make_scorer(options.scorer, spacy_model=options.spacy_model)
    delta_for = (lambda answer: options.delta) if options.delta is not None else scorer.threshold
    ratio = scorer.ratio if options.critical_ratio is None else options.critical_ratio
    partial = out_path + ".partial"
    done = {}
    if os.path.exists(out_path):
        for record in read_preference_file(out_path, num_negatives=2):
            done[str(record.id)] = record
    for record in read_partial(partial):
        done[str(record.id)] = record
    options_used = {k: v for k, v in vars(options).items() if k not in RESUME_FREE_OPTIONS}
    options_used["scorer"] = scorer.name  # what auto resolved to (terms, or words without spaCy)
    options_used.update(generator or generator_options(None))
    manifest = {"options": options_used,
                "fingerprints": provenance or {},
                "records": {str(r.id): _record_hash(r) for r in list(raw) + list(general)}}
    check_manifest(out_path, manifest, built=set(done))
    with writing(partial, intact=f"{out_path} and its .partial are as they were"):
        write_json_atomically(out_path + MANIFEST_SUFFIX, manifest)
        if done and not os.path.exists(partial):
            write_preference_file(list(done.values()), partial)
    counts = {"input": len(raw), "general_input": len(general), "already_built": 0, "built": 0,
              "skipped_no_critical": 0, "skipped_no_irrelevant": 0, "skipped_no_question": 0,
              "dropped_degenerate": 0, "scorer": scorer.name, "delta": delta_for("answer"),
              "delta_without_answer": delta_for(None), "critical_ratio": ratio}
    general_todo = [d for d in general if d.id not in done]
    todo = [r for r in raw if r.id not in done]
    counts["already_built"] = len(raw) + len(general) - len(todo) - len(general_todo)
    bar = tqdm(total=len(todo) + len(general_todo), desc="building", unit="record", disable=not progress,
               dynamic_ncols=True)
    started = time.monotonic()
    try:
        if general_todo:
            asked = generate_questions(general_todo, tokenizer, generate, options, counts)
            bar.update(len(general_todo) - len(asked))
            todo += asked
        with writing(partial, intact=_safe_in(partial)), open(partial, "a", encoding="utf-8") as sink:
            for start in range(0, len(todo), options.batch_size):
                plans, prompts = [], []
                for record in todo[start:start + options.batch_size]:
                    chunks = split_chunks(tokenizer, record.context, options.chunk_tokens)
                    scores = scorer.scores(chunks, record.question, record.answer)
                    critical, irrelevant = select_chunks(scores, options, delta_for(record.answer), ratio)
                    if not critical or not irrelevant:
                        counts["skipped_no_critical" if not critical else "skipped_no_irrelevant"] += 1
                        bar.update(1)
                        continue
                    plan = Plan(record, chunks, critical, irrelevant, scores)
                    plans.append(plan)
                    for context in plan.prompts():
                        stub = PreferenceRecord(record.id, tuple(context), record.question, "x", ("x",), options.system)
                        prompts.append(encode_prompt(stub, tokenizer))
                outputs = _generate(generate, prompts, [p.record.id for p in plans for _ in range(3)]) if prompts else []
                for k, plan in enumerate(plans):
                    chosen, unfollowing, hallucination = outputs[3 * k:3 * k + 3]
                    if degenerate(chosen, (unfollowing, hallucination)) is not None:
                        counts["dropped_degenerate"] += 1
                        continue
                    record = PreferenceRecord(plan.record.id, tuple(plan.training_context()), plan.record.question,
                                              chosen, (unfollowing, hallucination), options.system)
                    sink.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                    counts["built"] += 1
                sink.flush()
                os.fsync(sink.fileno())
                bar.update(len(plans))
                _show_rate(bar, generate, started)
    except ServiceError as error:  # a generation server failed: what is built stays in the .partial
        raise error.with_intact(_safe_in(partial)()) from None
    finally:
        bar.close()
    if os.path.getsize(partial) == 0:  # nothing built now or before: write nothing
        os.remove(partial)
        counts["written"] = 0
        return counts
    records = read_preference_file(partial, num_negatives=2)  # validated before it becomes the output
    with writing(out_path, intact=_safe_in(partial)):
        write_preference_file(records, out_path)
        os.remove(partial)
    counts["written"] = len(records)
    return counts


def _show_rate(bar, generate, started: float) -> None:
    """Generated tokens per second on the progress bar (records per second is the bar's own rate)."""
    tokens = getattr(generate, "tokens", None)
    if tokens is not None:
        bar.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-9):.1f} tokens/s", refresh=False)


MANIFEST_SUFFIX = ".build.json"
RESUME_FREE_OPTIONS = ("batch_size",)


def generator_options(endpoint: Optional[EndpointOptions]) -> dict:
    """What a build's manifest records of its generator: in-process, or the server's model name and prompt format
    (not its URL: a restarted server on another address resumes the build)."""
    if endpoint is None:
        return {"generator": "in-process"}
    return {"generator": "endpoint", "endpoint_model": endpoint.model, "prompt_format": endpoint.prompt_format}


def _resolved(name: str, value):
    """An option as compared on resume; an older manifest's scorer ``"auto (terms)"`` is the scorer it used."""
    if name == "scorer" and isinstance(value, str) and value.endswith(")") and " (" in value:
        return value[value.index(" (") + 2:-1]
    return value


def _record_hash(record: "RawRecord") -> str:
    import hashlib

    text = json.dumps([record.id, record.context, record.question, record.answer, record.kind], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def check_manifest(out_path: str, manifest: dict, built: set) -> None:
    """Resuming a build (``built``: the ids already built) whose records, model or options changed is refused,
    listing the changes (module doc)."""
    from ..fingerprint import differences

    path = out_path + MANIFEST_SUFFIX
    if not built or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        raise RunDirectoryError(f"{path}: unreadable; remove it and {out_path}(.partial) to build afresh") from None
    changed = differences(saved.get("fingerprints", {}), manifest["fingerprints"])
    changed += [f"--{k.replace('_', '-')}: {v!r} -> {manifest['options'].get(k)!r}"
                for k, v in saved.get("options", {}).items() if manifest["options"].get(k) != _resolved(k, v)]
    old, new = saved.get("records", {}), manifest["records"]
    gone = sorted(i for i in built if i in old and i not in new)
    edited = sorted(i for i in built if i in old and i in new and old[i] != new[i])
    if edited:
        changed.append(f"input record(s) changed since they were built: {', '.join(edited[:8])}"
                       + (f" and {len(edited) - 8} more" if len(edited) > 8 else ""))
    if gone:
        changed.append(f"record(s) built but no longer in the input: {', '.join(gone[:8])}"
                       + (f" and {len(gone) - 8} more" if len(gone) > 8 else ""))
    if changed:
        raise RunDirectoryError(f"--out {out_path}: the build there came from other inputs or options; resuming "
                                "would mix two builds. Use another --out (or remove the old output):\n"
                                + "\n".join(changed))


def _safe_in(partial: str) -> Callable[[], str]:
    """What a failed write leaves intact, counted when it fails."""
    def intact() -> str:
        try:
            with open(partial, "rb") as handle:
                count = sum(1 for line in handle if line.endswith(b"\n") and line.strip())
        except OSError:
            count = 0
        return f"{count} record(s) built so far are safe in {partial}; rerun the same command to resume"
    return intact


def read_partial(path: str) -> List[PreferenceRecord]:
    """The records of a build's ``.partial`` file, whatever point the build was killed at: a missing or empty
    file holds none; a torn last line (killed mid-write) is cut from the file, and a complete last record that
    lost only its newline gets it back, so the next append starts on a clean line. A bad line elsewhere is a real
    error (file:line)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        data = handle.read()
    tail = data[data.rfind(b"\n") + 1:]  # what follows the last newline: empty after a complete write
    if tail.strip():
        try:
            json.loads(tail)
            complete = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        with open(path, "r+b") as handle:
            if complete:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(len(data) - len(tail))
        data = data + b"\n" if complete else data[:len(data) - len(tail)]
    if not data.strip():
        return []
    return read_preference_file(path, num_negatives=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logo.data", description="LOGO preference data tools",
                                     epilog="--debug: show the traceback of a user error too")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="raw QA records (+ general documents) -> preference records generated by the "
                                     "policy model", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--input", help="raw QA JSONL: id, context, question, answer?")
    b.add_argument("--general-docs", help="question-less documents JSONL: id, text (questions are generated)")
    b.add_argument("--model", required=True, help="local directory of the policy model (HF causal LM)")
    b.add_argument("--out", required=True, help="output preference JSONL")
    d = BuildOptions()
    b.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="tokens per context chunk")
    b.add_argument("--context-chunks", type=int, default=d.context_chunks,
                   help="N: chunks in the training context (critical + irrelevant)")
    b.add_argument("--max-critical", type=int, default=None, help="critical chunks kept at most (default: N / 2)")
    b.add_argument("--scorer", default=d.scorer, choices=SCORERS,
                   help="chunk importance: terms = entities + noun/verb lemmas of question and answer (the release's "
                        "set), entities = the paper's literal entity overlap with the question, release = the "
                        "authors' code, words = word overlap; auto = terms when spaCy and --spacy-model load, else "
                        "words")
    b.add_argument("--spacy-model", default=d.spacy_model, help="spaCy pipeline name or path")
    b.add_argument("--delta", type=int, default=None,
                   help="a chunk is critical when its score > delta (default: terms 2, or 1 for a record without an "
                        "answer; entities 6, release 2, words 1)")
    b.add_argument("--critical-ratio", type=float, default=None,
                   help="... and its score >= this x the best chunk's (default: terms 0.5, the others 0)")
    b.add_argument("--batch-size", type=int, default=d.batch_size, help="records per generate call (x3 prompts)")
    b.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens generated per response")
    b.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (0: greedy)")
    b.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling")
    b.add_argument("--top-k", type=int, default=d.top_k,
                   help="sample among the k most likely tokens (0: all); sent to a server too")
    b.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    b.add_argument("--system", default=None, help="system prompt for generation and the records")
    b.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights' dtype of in-process generation")
    b.add_argument("--no-progress", action="store_true")
    e = b.add_argument_group("generation through an OpenAI-compatible server (vLLM, SGLang, transformers serve); "
                             "--model still gives the tokenizer, chat template and fingerprints")
    d = EndpointOptions("", "")
    e.add_argument("--endpoint", default=None, metavar="URL",
                   help="the server's base URL, e.g. http://127.0.0.1:8000/v1 (default: generate in-process)")
    e.add_argument("--endpoint-model", default=None, help="the model name the server serves (default: --model)")
    e.add_argument("--api-key-env", default=d.api_key_env,
                   help="environment variable holding the server's API key (not sent when unset)")
    e.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at most")
    e.add_argument("--request-timeout", type=float, default=d.timeout, help="seconds one request may take")
    e.add_argument("--retries", type=int, default=d.retries,
                   help="retries of a request after a connection error, timeout or HTTP 408/429/5xx")
    e.add_argument("--retry-backoff", type=float, default=d.backoff,
                   help="seconds before the first retry, doubled at each next one")
    e.add_argument("--prompt-format", default=d.prompt_format, choices=PROMPT_FORMATS,
                   help="send the rendered prompt as text (every server) or as token ids (vLLM, SGLang)")
    return parser


def build_fingerprints(model: str) -> dict:
    """The policy model and tokenizer a build generates with (:mod:`logo.fingerprint`)."""
    from ..fingerprint import model_fingerprint, tokenizer_fingerprint

    return {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(model)}


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.input and not args.general_docs:
        raise ConfigError("give --input (QA records) and/or --general-docs (documents)")
    options = BuildOptions(chunk_tokens=args.chunk_tokens, context_chunks=args.context_chunks,
                           max_critical=args.max_critical, delta=args.delta, critical_ratio=args.critical_ratio,
                           scorer=args.scorer, spacy_model=args.spacy_model, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed, system=args.system).validate()
    if not os.path.isdir(args.model):
        raise ConfigError(f"--model: {args.model} is not an existing directory (a local Hugging Face model "
                          "directory; nothing is downloaded)")
    endpoint = None
    if args.endpoint is not None:
        endpoint = EndpointOptions(args.endpoint, args.endpoint_model or args.model, args.api_key_env,
                                   args.concurrency, args.request_timeout, args.retries, args.retry_backoff,
                                   args.prompt_format).validate()
    from ..run_lock import RunLock

    lock = RunLock(args.out, f"--out {args.out}", inside=False)
    with writing(os.path.dirname(os.path.abspath(args.out))):
        lock.acquire()
    try:
        return _build_locked(args, options, endpoint)
    finally:
        lock.release()  # also when the build fails: a caller in the same process may resume at once


def _warn_unless_sampling(model_dir: str, options: BuildOptions) -> None:
    """``transformers serve`` samples only when the model's generation_config.json sets do_sample: say so."""
    if options.temperature <= 0:
        return
    try:
        with open(os.path.join(model_dir, "generation_config.json"), encoding="utf-8") as handle:
            do_sample = json.load(handle).get("do_sample") is True
    except (OSError, ValueError, AttributeError):
        do_sample = False
    if not do_sample:
        print(f"logo.data: warning: {model_dir}/generation_config.json does not set do_sample: true; "
              "`transformers serve` then decodes greedily whatever --temperature (vLLM and SGLang sample)",
              file=sys.stderr)


def _build_locked(args, options: BuildOptions, endpoint) -> int:
    raw = read_raw_file(args.input) if args.input else []
    general = read_general_docs(args.general_docs) if args.general_docs else []
    clash = {r.id for r in raw} & {d.id for d in general}
    if clash:
        raise InputFileError(f"ids used by both --input and --general-docs: {sorted(clash)[:5]}")
    scorer = make_scorer(options.scorer, spacy_model=options.spacy_model,
                         log=lambda m: print(m, file=sys.stderr))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if endpoint is not None:
        _warn_unless_sampling(args.model, options)
        generate = endpoint_generator(tokenizer, options, endpoint, log=lambda m: print(m, file=sys.stderr))
    else:
        dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).eval()
        if torch.cuda.is_available():
            model.cuda()
        torch.manual_seed(options.seed)
        generate = hf_generator(model, tokenizer, options)
    counts = build(raw, tokenizer, generate, args.out, options,
                   progress=not args.no_progress, scorer=scorer, general=general,
                   provenance=build_fingerprints(args.model), generator=generator_options(endpoint))
    print(json.dumps(counts))
    if counts["written"] == 0:
        print(f"logo.data: nothing built, nothing written: {counts['skipped_no_critical']} record(s) without a "
              f"critical chunk (score > delta = {counts['delta']}), {counts['skipped_no_irrelevant']} without an "
              f"irrelevant one, {counts['skipped_no_question']} document(s) without a generated question, "
              f"{counts['dropped_degenerate']} degenerate sample(s)"
              + ("; --scorer entities is the paper read literally and rarely finds a critical chunk, --scorer auto "
                 "does" if counts["scorer"] == "entities" and counts["skipped_no_critical"] else ""), file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("logo.data", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""LOGO preference records: one JSON object per line (JSONL).

    {"id": str, "context": str | [str, ...], "question": str, "chosen": str,
     "rejected": [str, ...], "system": str (optional)}

``context`` is the long input (one string, or its chunks); ``chosen`` the preferred response; ``rejected``
the M dis-preferred ones (instruction unfollowing, hallucination, ...). Other fields are ignored.
:func:`read_preference_file` checks every line and raises :class:`InvalidPreferenceFile` listing each
problem as ``file:line: field: message`` — nothing is trained on an invalid file.
:func:`write_preference_file` writes atomically (temp file + rename) with ``context`` always a list, so
the file also loads with Hugging Face ``datasets.load_dataset("json", data_files=...)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from ..errors import InputFileError, read_json_lines

REQUIRED = ("id", "context", "question", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRecord:
    id: str
    context: Tuple[str, ...]
    question: str
    chosen: str
    rejected: Tuple[str, ...]
    system: Optional[str] = None

    def to_json(self) -> dict:
        out = {"id": self.id, "context": list(self.context), "question": self.question, "chosen": self.chosen,
               "rejected": list(self.rejected)}
        if self.system is not None:
            out["system"] = self.system
        return out


class InvalidPreferenceFile(InputFileError):
    """Every problem found in a preference file; ``errors`` holds the ``file:line: field: message`` lines."""

    def __init__(self, path: str, errors: List[str]):
        self.path, self.errors = path, errors
        shown = "\n  ".join(errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{path}: {len(errors)} invalid record field(s); refusing to use the file:\n  {shown}{more}")


def _nonempty_string(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def record_problems(obj, num_negatives: int) -> List[Tuple[str, str]]:
    """(field, message) for each problem of one decoded record; empty when it is valid."""
    if not isinstance(obj, dict):
        return [("record", f"must be a JSON object, got {type(obj).__name__}")]
    problems = [(name, "missing") for name in REQUIRED if name not in obj]
    if "id" in obj and not (_nonempty_string(obj["id"]) or isinstance(obj["id"], int)):
        problems.append(("id", "must be a non-empty string or an int"))
    if "context" in obj:
        context = obj["context"]
        if isinstance(context, list):
            if not context or not all(_nonempty_string(c) for c in context):
                problems.append(("context", "a list of chunks must be non-empty and hold non-empty strings"))
        elif not _nonempty_string(context):
            problems.append(("context", f"must be a non-empty string or a list of strings, got {type(context).__name__}"))
    for name in ("question", "chosen"):
        if name in obj and not _nonempty_string(obj[name]):
            problems.append((name, "must be a non-empty string" + (" (empty response)" if name == "chosen" else "")))
    if "rejected" in obj:
        rejected = obj["rejected"]
        if not isinstance(rejected, list):
            problems.append(("rejected", f"must be a list of strings, got {type(rejected).__name__}"))
        else:
            for j, response in enumerate(rejected):
                if not _nonempty_string(response):
                    problems.append((f"rejected[{j}]", "must be a non-empty string (empty response)"))
            if len(rejected) < num_negatives:
                problems.append(("rejected", f"has {len(rejected)} responses, fewer than num_negatives = {num_negatives}"))
    if "system" in obj and obj["system"] is not None and not isinstance(obj["system"], str):
        problems.append(("system", f"must be a string, got {type(obj['system']).__name__}"))
    return problems


def read_preference_file(path: str, num_negatives: int = 2) -> List[PreferenceRecord]:
    """Reads and validates a JSONL preference file (module doc); blank lines are skipped."""
    records, errors, seen = [], [], {}
    for line_no, obj, bad in read_json_lines(path, "preference file"):
        if bad is not None:
            errors.append(f"{path}:{line_no}: record: not valid JSON ({bad.msg} at column {bad.colno})")
            continue
        problems = record_problems(obj, num_negatives)
        errors += [f"{path}:{line_no}: {field}: {message}" for field, message in problems]
        if problems:
            continue
        key = str(obj["id"])
        if key in seen:
            errors.append(f"{path}:{line_no}: id: duplicate of line {seen[key]} ({key!r})")
            continue
        seen[key] = line_no
        context = obj["context"] if isinstance(obj["context"], list) else [obj["context"]]
        records.append(PreferenceRecord(key, tuple(context), obj["question"], obj["chosen"],
                                        tuple(obj["rejected"]), obj.get("system")))
    if errors:
        raise InvalidPreferenceFile(path, errors)
    if not records:
        raise InvalidPreferenceFile(path, [f"{path}: no records"])
    return records


def write_preference_file(records: Iterable[PreferenceRecord], path: str) -> int:
    """Writes records as JSONL atomically (a reader never sees a half-written file); returns the count."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".jsonl.tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return count

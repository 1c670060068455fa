"""One error style for every command line of the package (``logo.train``, ``logo.data``, ``logo.estimate``,
``logo.eval``).

A :class:`UserError` is a mistake in what the user asked for — a bad option or config field, a missing or
malformed input file (``file:line``), a run directory that would be overwritten. :func:`run_cli` prints it as
``prog: error: message`` (one line, or one line per problem) and exits with code 2, without a traceback;
``--debug`` shows the traceback as well. Every other exception is an internal error and keeps its traceback.
"""
from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

USAGE_EXIT = 2


class UserError(ValueError):
    """A mistake in the user's input (module doc). Subclasses ValueError so library callers can catch either."""


class ConfigError(UserError):
    """A config field or command-line option with a wrong type, range or combination."""


class InputFileError(UserError):
    """An input file that is missing, unreadable or malformed; the message names ``file:line`` where it can."""


class RunDirectoryError(UserError):
    """A run directory that cannot be used as asked (it would be overwritten, or resumed with another meaning)."""


def read_text_lines(path: str, what: str = "file"):
    """Yields (line number, text) of a UTF-8 text file; a missing file or a line that is not UTF-8 is an
    :class:`InputFileError` naming ``path`` or ``path:line``."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise InputFileError(f"{path}: permission denied") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputFileError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                     f"{error.start + 1})") from None


def read_json_lines(path: str, what: str = "file") -> Iterator[Tuple[int, Any, Optional[json.JSONDecodeError]]]:
    """Yields (line number, decoded value, None) for each non-blank line of a JSONL file, or (line number, None, the
    decode error) for a line that is not JSON — the caller words (or collects) that error; a missing file or
    non-UTF-8 line raises as in :func:`read_text_lines`."""
    for number, line in read_text_lines(path, what):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as error:
            yield number, None, error


def strip_debug(argv: Optional[Sequence[str]]) -> tuple:
    """(argv without ``--debug``, whether it was there)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [a for a in args if a != "--debug"], "--debug" in args


def run_cli(prog: str, main: Callable[[List[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``main(argv)``; a :class:`UserError` becomes ``prog: error: ...`` on stderr and exit code 2."""
    args, debug = strip_debug(argv)
    try:
        return main(args)
    except UserError as error:
        if debug:
            traceback.print_exc()
        lines = str(error).splitlines() or [type(error).__name__]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line.strip()}", file=sys.stderr)
        return USAGE_EXIT

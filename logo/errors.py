"""One error style for every command line of the package (``logo.train``, ``logo.data``, ``logo.estimate``,
``logo.eval``).

A :class:`UserError` is a mistake in what the user asked for — a bad option or config field, a missing or
malformed input file (``file:line``), a run directory that would be overwritten. :func:`run_cli` prints it as
``prog: error: message`` (one line, or one line per problem) and exits with code 2, without a traceback;
``--debug`` shows the traceback as well. A :class:`StorageError` — the operating system refused a write (no space
left, permission denied, a read-only or vanished directory) — is printed the same way and exits with code 4; its
message names the path, the OS reason and what is intact. Every other exception is an internal error and keeps
its traceback.

Exit codes of every command line: 0 done, 1 internal error, 2 user error, 3 training diverged (``logo.train``),
4 an output could not be written, 75 stopped by SIGTERM / SIGINT after writing a checkpoint (``logo.train``;
EX_TEMPFAIL: resume later) or a service the command needs failed after its retries (a :class:`ServiceError`:
``logo.data build``'s generation server; what was done is kept, rerun to resume), 128 + the signal's number after
a second signal (exited at once).
"""
from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

USAGE_EXIT = 2
STORAGE_EXIT = 4
SERVICE_EXIT = 75


class UserError(ValueError):
    """A mistake in the user's input (module doc). Subclasses ValueError so library callers can catch either."""


class ConfigError(UserError):
    """A config field or command-line option with a wrong type, range or combination."""


class InputFileError(UserError):
    """An input file that is missing, unreadable or malformed; the message names ``file:line`` where it can."""


class RunDirectoryError(UserError):
    """A run directory that cannot be used as asked (it would be overwritten, or resumed with another meaning)."""


class StorageError(Exception):
    """Writing an output failed in the operating system. ``str()`` is the one-line report: the path, the OS
    reason and (``intact``) what is still complete."""

    def __init__(self, path: str, reason: str, intact: str = ""):
        self.path, self.reason, self.intact = path, reason, intact
        super().__init__(self._text())

    def _text(self) -> str:
        return f"cannot write {self.path}: {self.reason}" + (f"; {self.intact}" if self.intact else "")

    def with_intact(self, intact: str) -> "StorageError":
        """The same error, saying what is intact (set once, by the innermost caller that knows)."""
        if not self.intact and intact:
            self.intact = intact
            self.args = (self._text(),)
        return self

    def with_hint(self, hint: str) -> "StorageError":
        """The same error with ``hint`` (what to do next) appended."""
        if hint and hint not in self.intact:
            self.intact = f"{self.intact}; {hint}" if self.intact else hint
            self.args = (self._text(),)
        return self

    @classmethod
    def from_os(cls, error: OSError, path: str = None, intact: str = "") -> "StorageError":
        reason = error.strerror or str(error) or type(error).__name__
        return cls(error.filename or path or "?", reason, intact)


class ServiceError(Exception):
    """A service the command depends on (a generation server) failed after retries. ``str()`` is the one-line
    report: what failed and (``intact``) what is kept."""

    def __init__(self, message: str, intact: str = ""):
        self.message, self.intact = message, intact
        super().__init__(message + (f"; {intact}" if intact else ""))

    def with_intact(self, intact: str) -> "ServiceError":
        """The same error, saying what is kept (set once, by the innermost caller that knows)."""
        if not self.intact and intact:
            self.intact = intact
            self.args = (f"{self.message}; {intact}",)
        return self


def as_storage_error(error: BaseException, path: str) -> Optional["StorageError"]:
    """The :class:`StorageError` an OS-level write failure stands for — an :class:`OSError`, or safetensors'
    own error carrying the OS error code — else None."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, OSError):
        return StorageError.from_os(error, path)
    if type(error).__name__ == "SafetensorError":
        import os
        import re

        code = re.search(r"code: (\d+)", str(error))
        reason = os.strerror(int(code.group(1))) if code else (str(error).splitlines() or ["write failed"])[0][:160]
        return StorageError(path, reason)
    return None


class writing:
    """``with writing(path, intact=...):`` turns an OS-level write failure raised inside (:func:`as_storage_error`)
    into a :class:`StorageError` naming ``path`` (or the file the OS named); ``intact`` (a string, or a callable
    asked at the failure) says what is still complete."""

    def __init__(self, path: str, intact: str = ""):
        self.path, self.intact = path, intact

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        failure = None if kind is None else as_storage_error(value, self.path)
        if failure is not None and failure is not value:
            raise failure.with_intact(self.intact() if callable(self.intact) else self.intact) from None
        return False


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
    except StorageError as error:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return STORAGE_EXIT
    except ServiceError as error:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return SERVICE_EXIT

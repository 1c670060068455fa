"""One writer per output: an OS lock held for the whole life of the process that writes a run directory
(``logo.train``), a builder output (``logo.data build --out``) or an evaluation output (``logo.eval --out``).

The lock is ``flock(LOCK_EX | LOCK_NB)`` on a small lock file (``<run>/.lock``; ``.<name>.lock`` beside an output
file or directory). The kernel drops it when its process ends, however it ends — ``kill -9`` included — so a
lock left by a dead process never blocks; the file's existence means nothing. While held, the file names its
holder (pid, host, start time, command), and a second writer is refused with one line naming it.

On network file systems ``flock`` works where the mount supports it (NFSv4; Lustre with ``-o flock``); a file
system without lock support is refused with its reason, and ``LOGO_RUN_LOCK=off`` runs without the lock (then
keeping writers apart is the user's job).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from typing import Optional

from .errors import RunDirectoryError

try:  # POSIX; on other systems the lock is unavailable and said so
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

DISABLE = "LOGO_RUN_LOCK"


def lock_path_for(target: str, inside: bool) -> str:
    """``<target>/.lock`` for a directory that holds the run, else ``.<name>.lock`` beside ``target``."""
    target = os.path.abspath(target.rstrip(os.sep) or os.sep)
    if inside:
        return os.path.join(target, ".lock")
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _holder(handle) -> str:
    try:
        handle.seek(0)
        info = json.loads(handle.read() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(info["since"]))
        command = info["command"] if len(info["command"]) <= 80 else info["command"][:77] + "..."
        return f"pid {info['pid']} on {info['host']} since {since} ({command})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another process (its pid is not written yet)"


class RunLock:
    """``RunLock(target, what).acquire()`` holds the lock until :meth:`release` (or the process ends).
    ``what`` names the output in messages, e.g. ``"output_dir runs/x"``."""

    def __init__(self, target: str, what: str, inside: bool = True):
        self.path, self.what = lock_path_for(target, inside), what
        self.handle = None

    def acquire(self) -> "RunLock":
        if os.environ.get(DISABLE, "").lower() in ("off", "0", "no", "false"):
            return self
        if fcntl is None:  # pragma: no cover
            raise RunDirectoryError(f"{self.what}: this system has no flock(); set {DISABLE}=off to run unlocked")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            try:
                if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunDirectoryError(f"{self.what} is in use by {_holder(handle)}: one writer per output "
                                            f"(lock {self.path}); wait for it to end, or use another path") from None
                raise RunDirectoryError(f"{self.what}: cannot lock {self.path} ({error.strerror}): the file system "
                                        f"may not support locks; set {DISABLE}=off to run unlocked") from None
            finally:
                handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": _command()}))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            try:
                self.handle.seek(0)
                self.handle.truncate()  # no stale holder text; the file itself may stay
            except OSError:
                pass
            self.handle.close()  # closing drops the flock
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        package = os.path.basename(os.path.dirname(argv[0]))
        argv[0] = f"python -m logo.{package}" if package != "logo" else "python -m logo"
    elif argv and argv[0].endswith("train.py"):
        argv[0] = "python -m logo.train"
    text = " ".join(argv)
    return text if len(text) <= 160 else text[:157] + "..."


def holder_pid(target: str, inside: bool = True) -> Optional[int]:
    """The pid the lock file of ``target`` names (None when released or unreadable); for tests and reports."""
    try:
        with open(lock_path_for(target, inside), encoding="utf-8") as handle:
            return json.loads(handle.read() or "{}").get("pid")
    except (OSError, ValueError):
        return None

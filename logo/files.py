"""Files written whole or not at all: into ``<path>.tmp-<pid>`` first, then renamed over ``path``. A failed write
(no space left, ...) removes its temporary and leaves the previous file; a kill leaves at worst a ``.tmp-``
leftover, which :mod:`logo.run_dir` removes."""
from __future__ import annotations

import json
import os
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(temporary_path)``, then renames the temporary file over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception:
        remove_quietly(tmp)
        raise


def remove_quietly(path: str) -> None:
    """Removes a file or directory tree if it is there; errors (it is already gone, the disk is read-only) are
    ignored: used on the way out of a failed write."""
    import shutil

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def write_text_atomically(path: str, text: str, *, fsync: bool = False) -> None:
    """``text`` (UTF-8) to ``path`` atomically; ``fsync`` flushes it to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())

    write_atomically(path, write)


def write_json_atomically(path: str, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))

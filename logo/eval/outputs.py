"""Atomic evaluation outputs: files are written into ``<out>.tmp-<pid>/`` and the directory is renamed into place
when complete, so a reader never sees a half-written result. An existing output directory is never silently
replaced: ``overwrite=True`` is needed. One writer per ``--out``: an OS lock (``.<out>.lock`` beside it,
:mod:`logo.run_lock`) is held from the check to the commit, and another evaluation into the same ``--out`` is
refused naming its holder. A failed write (no space left, permission denied) removes the temporary directory,
leaves an earlier ``--out`` as it was and raises :class:`~logo.errors.StorageError`."""
from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Iterable, List

from ..errors import RunDirectoryError, writing
from ..files import remove_quietly
from ..run_lock import RunLock


class OutputDirectory:
    def __init__(self, path: str, overwrite: bool = False):
        self.path = path
        self.lock = RunLock(path, f"--out {path}", inside=False)
        with writing(os.path.dirname(os.path.abspath(path))):
            self.lock.acquire()
        try:
            if os.path.exists(path) and not overwrite:
                raise RunDirectoryError(f"--out {path} already exists: pass --overwrite to replace it, or another "
                                        "--out")
            base = path.rstrip(os.sep)
            parent = os.path.dirname(os.path.abspath(base))
            for name in os.listdir(parent):  # temporaries of killed evaluations (the lock says none is running)
                if name.startswith(os.path.basename(base) + ".tmp-"):
                    remove_quietly(os.path.join(parent, name))
            self.tmp = f"{base}.tmp-{os.getpid()}"
            with writing(self.tmp):
                os.makedirs(self.tmp)
        except BaseException:
            self.lock.release()
            raise

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def json(self, name: str, data) -> None:
        with writing(self.file(name)), open(self.file(name), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)

    def csv(self, name: str, rows: List[dict]) -> None:
        fields: List[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        with writing(self.file(name)), open(self.file(name), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def png(self, name: str, figure) -> None:
        with writing(self.file(name)):
            figure.savefig(self.file(name), dpi=120, bbox_inches="tight", format="png")

    def commit(self) -> str:
        with writing(self.path):
            if os.path.exists(self.path):
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        self.lock.release()
        return self.path

    def abandon(self) -> None:
        remove_quietly(self.tmp)
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.abandon()


def files(path: str) -> Iterable[str]:
    return sorted(os.listdir(path))

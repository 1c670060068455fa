"""Atomic evaluation outputs: files are written into ``<out>.tmp-<pid>/`` and the directory is renamed into place
when complete, so a reader never sees a half-written result. An existing output directory is never silently
replaced: ``overwrite=True`` is needed."""
from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Iterable, List

from ..errors import RunDirectoryError


class OutputDirectory:
    def __init__(self, path: str, overwrite: bool = False):
        self.path = path
        if os.path.exists(path) and not overwrite:
            raise RunDirectoryError(f"--out {path} already exists: pass --overwrite to replace it, or another --out")
        self.tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def json(self, name: str, data) -> None:
        with open(self.file(name), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)

    def csv(self, name: str, rows: List[dict]) -> None:
        fields: List[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        with open(self.file(name), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def png(self, name: str, figure) -> None:
        figure.savefig(self.file(name), dpi=120, bbox_inches="tight", format="png")

    def commit(self) -> str:
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.abandon()


def files(path: str) -> Iterable[str]:
    return sorted(os.listdir(path))

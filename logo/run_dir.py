"""The run directory of ``python -m logo.train``: what may be started, resumed or overwritten there.

* A new run goes into a missing or empty directory. A directory that holds anything is refused unless
  ``--resume`` (continue the run there) or ``--overwrite`` (delete it, then start over).
* ``--resume`` compares the saved ``config.json`` with the new configuration and refuses every difference
  that changes what the run computes (model, data, optimiser, batch, seed, M, beta, gamma, lambda, ...), listing
  them; run length, logging, evaluation and checkpoint cadence may change (``TrainConfig`` field metadata).
* Stale temporary files of killed writes (``.tmp-*`` checkpoints, ``*.tmp-<pid>`` files, ``final.tmp``) are
  removed before the run starts.
* After a resume from step k, ``metrics.jsonl`` keeps the rows of steps <= k only (rows a killed invocation
  wrote past its last checkpoint are dropped), so every step is logged once; TensorBoard purges its events past
  k likewise (``purge_step``).

Every rank runs the same read-only checks (so all raise together); only the main rank writes.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .config import TrainConfig, resume_differences, save_config
from .errors import RunDirectoryError
from .files import write_text_atomically

CONFIG = "config.json"
METRICS = "metrics.jsonl"


def _stale_temporaries(root: str):
    for base, dirs, files in os.walk(root):
        for name in list(dirs):
            if name.startswith(".tmp-") or name.endswith(".tmp"):
                dirs.remove(name)
                yield os.path.join(base, name)
        for name in files:
            if ".tmp-" in name or name.endswith(".tmp"):
                yield os.path.join(base, name)


class RunDirectory:
    def __init__(self, config: TrainConfig, world):
        self.config, self.world = config, world
        self.path = config.output_dir
        self.checkpoints = os.path.join(self.path, "checkpoints")

    def holds_a_run(self) -> bool:
        return os.path.isdir(self.path) and bool(os.listdir(self.path))

    def check(self) -> None:
        """The rules of the module doc, read-only (every rank)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError(f"output_dir {self.path} exists and is not a directory")
        if not self.holds_a_run() or self.config.overwrite:
            return
        if not self.config.resume:
            shown = ", ".join(sorted(os.listdir(self.path))[:6])
            raise RunDirectoryError(f"output_dir {self.path} already holds a run ({shown}): pass --resume to continue "
                                    "it, --overwrite to delete it and start over, or another --output-dir")
        saved = self.saved_config()
        if saved is None:
            return
        differences = resume_differences(saved, self.config)
        if differences:
            raise RunDirectoryError(
                f"--resume: the configuration differs from the run in {self.path} in what it computes "
                f"(only run length, logging, evaluation and checkpointing may change):\n" + "\n".join(differences))

    def saved_config(self) -> Optional[dict]:
        path = os.path.join(self.path, CONFIG)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunDirectoryError(f"{path} is not valid JSON: the run directory is damaged; --overwrite starts "
                                    "over") from None

    def prepare(self) -> None:
        """check(), then (main rank) delete for --overwrite, clean stale temporaries, write config.json."""
        self.check()
        self.world.barrier()
        if self.world.is_main:
            if self.config.overwrite and self.holds_a_run():
                for name in os.listdir(self.path):
                    target = os.path.join(self.path, name)
                    shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
            os.makedirs(self.path, exist_ok=True)
            for stale in list(_stale_temporaries(self.path)):
                shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
            save_config(self.config, os.path.join(self.path, CONFIG))
        self.world.barrier()

    def truncate_metrics(self, last_step: int) -> None:
        """Keeps the metrics rows of steps <= last_step (and drops a torn last line); atomic."""
        path = os.path.join(self.path, METRICS)
        if not self.world.is_main or not os.path.isfile(path):
            return
        kept = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        write_text_atomically(path, "".join(kept))

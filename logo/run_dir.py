"""The run directory of ``python -m logo.train``: what may be started, resumed or overwritten there.

* A new run goes into a missing or empty directory. A directory that holds anything is refused unless
  ``--resume`` (continue the run there) or ``--overwrite`` (delete it, then start over).
* ``--resume`` compares the saved ``config.json`` with the new configuration and refuses every difference
  that changes what the run computes (model, data, optimiser, batch, seed, M, beta, gamma, lambda, ...), listing
  them; run length, logging, evaluation and checkpoint cadence may change (``TrainConfig`` field metadata).
* One writer: the main rank holds an OS lock on the directory (:mod:`logo.run_lock`) from before the checks until
  the run ends; another ``logo.train`` into it — new, ``--resume`` or ``--overwrite`` — is refused naming the holder.
* ``config.json`` holds content fingerprints (:mod:`logo.fingerprint`) of the training and evaluation files, the
  model directory's config and weights, and the tokenizer; ``--resume`` refuses any that changed under the same
  path, listing them (an evaluation file given under a new path is a declared change and is not compared).
* Stale temporary files of killed writes (``.tmp-*`` checkpoints, ``*.tmp-<pid>`` files, ``final.tmp``) are
  removed before the run starts.
* After a resume from step k, ``metrics.jsonl`` keeps the rows of steps <= k only (rows a killed invocation
  wrote past its last checkpoint are dropped), so every step is logged once; TensorBoard purges its events past
  k likewise (``purge_step``).

The main rank locks, checks and writes; every other rank raises the error the main rank met, so all stop together.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from . import fingerprint
from .config import TrainConfig, resume_differences
from .errors import RunDirectoryError, StorageError, writing
from .files import write_json_atomically, write_text_atomically
from .run_lock import RunLock

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
FINGERPRINTS = "fingerprints"


def run_fingerprints(config: TrainConfig) -> dict:
    """Fingerprints of the files the run reads (module doc); the embedded default's data and model come from
    the configuration itself and have none."""
    out = {}
    for name in ("train_file", "eval_file"):
        if getattr(config, name):
            out[name] = fingerprint.file_fingerprint(getattr(config, name))
    if config.model:
        out["model"] = fingerprint.model_fingerprint(config.model)
    if config.tokenizer or config.model:
        out["tokenizer"] = fingerprint.tokenizer_fingerprint(config.tokenizer or config.model)
    return out


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
        self.lock = RunLock(self.path, f"output_dir {self.path}")
        self.fingerprints = None

    def contents(self):
        return sorted(n for n in os.listdir(self.path) if n != LOCK) if os.path.isdir(self.path) else []

    def holds_a_run(self) -> bool:
        return bool(self.contents())

    def check(self) -> None:
        """The rules of the module doc, read-only (under the lock, on a directory that exists)."""
        if not self.holds_a_run() or self.config.overwrite:
            return
        if not self.config.resume:
            shown = ", ".join(self.contents()[:6])
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
        self.check_fingerprints(saved)

    def check_fingerprints(self, saved: dict) -> None:
        """--resume: the files the run reads hold what they held when it started (module doc)."""
        old = dict(saved.get(FINGERPRINTS) or {})
        if saved.get("eval_file") != self.config.eval_file:
            old.pop("eval_file", None)
        changed = fingerprint.differences(old, self.current_fingerprints())
        if changed:
            raise RunDirectoryError(
                f"--resume: what the run in {self.path} reads changed under the same paths (content fingerprints in "
                f"{CONFIG}); resuming would train on other data or another model. Restore them, or start a new run "
                "in another --output-dir:\n" + "\n".join(changed))

    def current_fingerprints(self) -> dict:
        if self.fingerprints is None:
            self.fingerprints = run_fingerprints(self.config)
        return self.fingerprints

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
        """Main rank: lock, check(), delete for --overwrite, clean stale temporaries, write config.json (with the
        fingerprints); the other ranks raise what it raised."""
        problem = None
        if self.world.is_main:
            try:
                self._prepare_main()
            except RunDirectoryError as error:
                problem = ("run", str(error))
            except StorageError as error:
                problem = ("storage", error.path, error.reason, error.intact)
        problem = self.world.from_main(problem)
        if problem is not None:
            raise RunDirectoryError(problem[1]) if problem[0] == "run" else StorageError(*problem[1:])

    def _prepare_main(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError(f"output_dir {self.path} exists and is not a directory")
        with writing(self.path):
            os.makedirs(self.path, exist_ok=True)
        self.lock.acquire()
        self.check()
        with writing(self.path):
            if self.config.overwrite and self.holds_a_run():
                for name in self.contents():
                    target = os.path.join(self.path, name)
                    shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
            for stale in list(_stale_temporaries(self.path)):
                shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
            write_json_atomically(os.path.join(self.path, CONFIG),
                                  {**self.config.to_dict(), FINGERPRINTS: self.current_fingerprints()})

    def close(self) -> None:
        """Releases the lock (the end of the run)."""
        self.lock.release()

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
        with writing(path):
            write_text_atomically(path, "".join(kept))

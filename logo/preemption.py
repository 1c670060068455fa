"""SIGTERM / SIGINT during training: finish the current optimizer step, checkpoint, exit for a later ``--resume``.

SLURM, Kubernetes and most schedulers send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT. The
first of either only records the request (:attr:`StopRequest.signal`); the training loop reads it after each
optimizer step — under DeepSpeed every rank takes the decision together (one all-reduce), so all ranks stop after
the same step even when only one got the signal — then writes a checkpoint and exits with
:data:`PREEMPTED_EXIT` (75, EX_TEMPFAIL). A second signal exits at once with 128 + its number, writing nothing.
Handlers are installed only in the main thread (Python's rule) and restored when the run ends.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Dict, Optional

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, prog: str = "logo.train"):
        self.prog = prog
        self.signal: Optional[int] = None
        self._previous: Dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.signal is not None:
            print(f"{self.prog}: second signal ({name}): exiting now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + number)
        self.signal = number
        print(f"{self.prog}: {name} received: stopping after the current optimizer step and writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

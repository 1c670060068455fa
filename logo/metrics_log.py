"""metrics.jsonl + TensorBoard events of a training run (main rank only).

After a resume from step k, TensorBoard drops the events past k that a killed invocation wrote
(``purge_step``); :meth:`logo.run_dir.RunDirectory.truncate_metrics` does the same for metrics.jsonl, so every
step is logged once. A failed write raises :class:`~logo.errors.StorageError` naming the file (a torn last line is
dropped on resume).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from .errors import StorageError, writing


class MetricsLog:
    def __init__(self, run_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
            except ImportError:
                print("logo.train: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
            handle.flush()
        if self.writer is not None:
            with self._tensorboard():
                for name, value in metrics.items():
                    if isinstance(value, (int, float)):
                        self.writer.add_scalar(f"{kind}/{name}", value, step)
                self.writer.flush()

    def _tensorboard(self):
        return writing(self.writer.log_dir if self.writer is not None else self.path)

    def close(self, quietly: bool = False) -> None:
        """Flushes and closes TensorBoard; ``quietly`` (on the way out of a failure) ignores a failed flush."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                with writing(writer.log_dir):
                    writer.close()
            except StorageError:
                if not quietly:
                    raise

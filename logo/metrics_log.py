"""metrics.jsonl + TensorBoard events of a training run (main rank only).

After a resume from step k, TensorBoard drops the events past k that a killed invocation wrote
(``purge_step``); :meth:`logo.run_dir.RunDirectory.truncate_metrics` does the same for metrics.jsonl, so every
step is logged once.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional


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
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""Learning-rate schedules of ``logo.train`` as multipliers of the peak rate (for ``torch.optim.lr_scheduler.LambdaLR``).

* warmup: linear from 1/(W+1) to 1 over ``warmup_steps`` W;
* then ``cosine`` (to 0 at ``max_steps``) or ``constant``.

Changing ``max_steps`` on ``--resume`` changes the rest of a cosine schedule from that step on (LambdaLR keeps the
step count, not the horizon).
"""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor

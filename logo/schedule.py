"""Learning-rate schedules of ``logo.train`` as multipliers of the peak rate (for ``torch.optim.lr_scheduler.LambdaLR``),
as a function of t, the number of optimizer steps taken so far (0 for the first step).

* ``warmup_constant`` (default; what the authors' ZeRO-3 runs used: DeepSpeed's ``WarmupLR`` with its default
  ``warmup_type="log"`` and ``warmup_min_lr=0``): 0 at t = 0, log(t) / log(W) for 1 <= t <= W (W = warmup_steps,
  at least 2), then 1 — the same rates, step for step, as DeepSpeed's scheduler;
* ``cosine``: linear warm-up from 1/(W+1) to 1 over W steps, then cosine to 0 at ``max_steps``;
* ``constant``: the same linear warm-up, then 1.

Changing ``max_steps`` on ``--resume`` changes the rest of a cosine schedule from that step on (LambdaLR keeps the
step count, not the horizon).
"""
from __future__ import annotations

import math

from .config import TrainConfig

SCHEDULES = ("warmup_constant", "cosine", "constant")


def lr_lambda(config: TrainConfig):
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if config.lr_schedule == "warmup_constant":
            if step == 0:
                return 0.0
            span = max(2, warmup)
            return min(1.0, math.log(step) / math.log(span))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, config.max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor

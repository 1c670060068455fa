"""Atomic, resumable training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` holding ``trainer.pt`` (trainable weights,
optimizer, scheduler, RNG states, step = data position) or, under DeepSpeed, the engine's own files plus
``trainer.pt`` without weights. It is written under a temporary name and renamed into place only when
complete, then ``<run>/checkpoints/latest`` (a one-line file) is replaced atomically. Killing the process
mid-save leaves at worst a ``.tmp-*`` directory, which is ignored and cleaned up; the previous checkpoint
and ``latest`` are untouched.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, Optional

import torch

from .files import write_text_atomically

LATEST = "latest"
TRAINER_STATE = "trainer.pt"


def _rng_state() -> Dict[str, Any]:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def trainable_state_dict(model) -> Dict[str, torch.Tensor]:
    """Only the parameters that train (LoRA adapters, or everything in full fine-tuning)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(root: str, step: int, *, model, optimizer, scheduler, engine=None, keep: int = 2,
                    is_main: bool = True, barrier=lambda: None) -> str:
    """Writes checkpoint ``step`` atomically (module doc) and keeps the newest ``keep``; returns its path.
    Every rank calls it under DeepSpeed (the engine saves its partitions); only ``is_main`` renames."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if is_main and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    barrier()
    state = {"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if engine is not None:
        engine.save_checkpoint(tmp, tag="engine")
    else:
        state["model"] = trainable_state_dict(model)
        state["optimizer"] = optimizer.state_dict()
    if is_main:
        os.makedirs(tmp, exist_ok=True)
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
    barrier()
    if is_main:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomically(os.path.join(root, LATEST), f"step-{step}\n", fsync=True)
        _prune(root, keep, step)
    barrier()
    return final


def _prune(root: str, keep: int, newest: int) -> None:
    """Keeps ``step-<newest>`` and the ``keep - 1`` checkpoints before it; checkpoints past ``newest`` (left by an
    abandoned continuation) go too, so ``latest`` always names a kept checkpoint."""
    steps = sorted((int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("step-") and
                    d.split("-")[1].isdigit()), reverse=True)
    older = [s for s in steps if s <= newest]
    for old in [s for s in steps if s > newest] + older[max(1, keep):]:
        shutil.rmtree(os.path.join(root, f"step-{old}"), ignore_errors=True)
    for d in os.listdir(root):
        if d.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        name = handle.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise RuntimeError(f"{pointer} names {name}, which is incomplete or missing; remove {pointer} to start over")
    return path


def load_checkpoint(path: str, *, model, optimizer, scheduler, engine=None) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=False)
    if engine is not None:
        engine.load_checkpoint(path, tag="engine")
    else:
        missing = set(trainable_state_dict(model)) - set(state["model"])
        if missing:
            raise RuntimeError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]} (another model?)")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])

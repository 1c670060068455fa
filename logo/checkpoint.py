"""Atomic, resumable training checkpoints that cannot run code when loaded.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` holding ``model.safetensors`` (the trainable weights)
and ``trainer.pt`` (optimizer, scheduler, RNG states, step = data position: tensors and plain values only) or,
under DeepSpeed, the engine's own files plus ``trainer.pt``. It is written under a temporary name and renamed
into place only when complete, then ``<run>/checkpoints/latest`` (a one-line file) is replaced atomically.
Killing the process mid-save leaves at worst a ``.tmp-*`` directory, which is ignored and cleaned up; a failed
write (no space left, ...) removes it and raises :class:`~logo.errors.StorageError` naming the path, the OS
reason and the last complete checkpoint. The previous checkpoint and ``latest`` are untouched either way.

Loading: ``trainer.pt`` with ``torch.load(weights_only=True)`` (no pickled code: a file holding anything else is
refused), the weights with safetensors. DeepSpeed's engine files are loaded by DeepSpeed with
``weights_only=False``; before that, each is opened with ``weights_only=True`` allowing exactly the DeepSpeed
and Python types its checkpoints hold (:data:`DEEPSPEED_SAFE_TYPES`), so a crafted file is refused there too.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
from typing import Any, Callable, Dict, Optional

import torch

from .errors import RunDirectoryError, StorageError, as_storage_error
from .files import remove_quietly, write_text_atomically

LATEST = "latest"
TRAINER_STATE = "trainer.pt"
WEIGHTS = "model.safetensors"


def _rng_state() -> Dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain values."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model) -> Dict[str, torch.Tensor]:
    """Only the parameters that train (LoRA adapters, or everything in full fine-tuning)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k in names}


class _RecordingFile:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write: torch re-raises it as a
    RuntimeError ("unexpected pos ..."), which would hide the OS reason."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_tensors_file(obj, path: str) -> None:
    """``torch.save(obj, path)``, flushed to disk; an OS failure raises the OSError itself."""
    with open(path, "wb") as handle:
        sink = _RecordingFile(handle)
        try:
            torch.save(obj, sink)
            handle.flush()
            os.fsync(handle.fileno())
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def _save_weights(weights: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(weights, path, metadata={"format": "pt"})
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def last_complete(root: str) -> str:
    """What a failure leaves intact, in words: the newest complete checkpoint under ``root``, or that there is none."""
    try:
        path = latest_checkpoint(root) if os.path.isdir(root) else None
    except RunDirectoryError:
        path = None
    return f"the last complete checkpoint is {os.path.basename(path)}" if path else "no checkpoint was written yet"


def save_checkpoint(root: str, step: int, *, model, optimizer, scheduler, engine=None, keep: int = 2,
                    is_main: bool = True, agree: Callable[[bool], bool] = bool) -> str:
    """Writes checkpoint ``step`` atomically (module doc) and keeps the newest ``keep``; returns its path.
    Every rank calls it under DeepSpeed (the engine saves its partitions); only ``is_main`` renames.
    ``agree(ok)`` is True when every rank's ``ok`` is (an all-reduce; ``bool`` for one process)."""
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    failure: Optional[StorageError] = None
    try:
        if is_main:
            os.makedirs(root, exist_ok=True)
            remove_quietly(tmp)
            os.makedirs(tmp)
    except OSError as error:
        failure = StorageError.from_os(error, tmp)
    if agree(failure is None):
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state()}
        try:
            if engine is not None:
                engine.save_checkpoint(tmp, tag="engine")
            if is_main:
                if engine is None:
                    _save_weights(trainable_state_dict(model), os.path.join(tmp, WEIGHTS))
                    state["optimizer"] = optimizer.state_dict()
                save_tensors_file(state, os.path.join(tmp, TRAINER_STATE))
        except Exception as error:
            failure = as_storage_error(error, tmp)
            if failure is None and engine is not None and isinstance(error, RuntimeError) and (
                    "write" in str(error).lower() or "pos" in str(error)):  # DeepSpeed's torch.save hides the OS reason
                failure = StorageError(tmp, f"the checkpoint write failed ({str(error).splitlines()[0][:120]}); "
                                            f"{_free_space(root)}")
            if failure is None:
                raise
    if agree(failure is None):
        try:
            if is_main:
                if os.path.isdir(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                write_text_atomically(os.path.join(root, LATEST), f"step-{step}\n", fsync=True)
                _prune(root, keep, step)
        except OSError as error:
            failure = StorageError.from_os(error, root)
    if agree(failure is None):
        return final
    if is_main:
        remove_quietly(tmp)
    failure = failure or StorageError(tmp, "another rank could not write its part of the checkpoint")
    raise failure.with_intact(last_complete(root))


def _free_space(path: str) -> str:
    try:
        stats = os.statvfs(path)
        return f"{stats.f_bavail * stats.f_frsize / 2 ** 20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


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
    if os.path.basename(name) != name or not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise RunDirectoryError(f"{pointer} names {name!r}, which is not a complete checkpoint there; remove "
                                f"{pointer} to start over")
    return path


def read_trainer_state(path: str) -> Dict[str, Any]:
    """``trainer.pt`` of a checkpoint, tensors and plain values only (module doc)."""
    import pickle

    file = os.path.join(path, TRAINER_STATE)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise RunDirectoryError(f"{file}: refused: it holds Python objects besides tensors and plain values, and "
                                f"loading it could run code ({detail.strip()[:160]}). A checkpoint of this version "
                                "never does; an older or foreign one must not be resumed from") from None


# what DeepSpeed 0.19 checkpoints hold besides tensors and plain containers (ZeRO stage enum, loss scalers,
# the config's enums); anything else in an engine file is refused before DeepSpeed unpickles it
DEEPSPEED_SAFE_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "collections.OrderedDict",
    "builtins.set",
    "torch.Size",
)


def _deepspeed_safe_globals() -> list:
    import importlib

    found = [set, torch.Size]
    for dotted in DEEPSPEED_SAFE_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(value, type):
            found.append(value)
    return found


def check_engine_files(path: str) -> None:
    """Every ``.pt`` file of a DeepSpeed checkpoint opens with ``weights_only=True`` and the allow-list."""
    import pickle

    allowed = _deepspeed_safe_globals()
    for file in sorted(glob.glob(os.path.join(path, "engine", "*.pt"))):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            line = next((x for x in str(error).splitlines() if "GLOBAL" in x or "Unsupported" in x), "")
            raise RunDirectoryError(f"{file}: refused: it holds objects outside DeepSpeed's checkpoint types, and "
                                    f"loading it could run code ({line.strip()[:160]})") from None


def load_checkpoint(path: str, *, model, optimizer, scheduler, engine=None) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    state = read_trainer_state(path)
    if engine is not None:
        check_engine_files(path)
        engine.load_checkpoint(path, tag="engine")
    else:
        from safetensors.torch import load_file

        weights_file = os.path.join(path, WEIGHTS)
        if not os.path.isfile(weights_file):
            raise RunDirectoryError(f"{path}: no {WEIGHTS} (a checkpoint of an older version, or incomplete)")
        weights = load_file(weights_file)
        missing = set(trainable_state_dict(model)) - set(weights)
        if missing:
            raise RunDirectoryError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]} "
                                    "(another model?)")
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])

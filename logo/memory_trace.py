"""Peak live tensor bytes of a piece of code, traced op by op (deterministic, allocator-independent).

``LiveTensorBytes`` is a ``TorchDispatchMode`` that records the storage of every tensor an op returns
and drops it when the storage is freed (a weak storage reference), so ``peak`` is the largest sum of
live storages seen after any op — forward, backward and optimizer alike. Tensors that exist before the
block (parameters, gradients, optimizer states) are counted with :meth:`track`. Allocations made
*inside* one custom op and freed before it returns (e.g. a C++ kernel's tile workspace) are not seen.
Used to validate :mod:`logo.estimate` against real steps on CPU.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: Dict[int, tuple] = {}
        self.live_bytes = 0
        self.peak = 0

    def track(self, tensors: Iterable) -> None:
        """Counts tensors that already exist (parameters, their grads, optimizer states)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live_bytes)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        known = self._live.get(key)
        if known is not None and not known[0].expired():
            return  # a view of a live storage
        if known is not None:
            self.live_bytes -= known[1]
        self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live_bytes += storage.nbytes()

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.live_bytes -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live_bytes)
        return out


def peak_of_a_training_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], optimizer) -> int:
    """Peak live tensor bytes of one full step (zero_grad, ``loss().backward()``, ``optimizer.step()``), traced on
    the second step, when the optimizer's states exist; parameters and states count from the start."""
    def full_step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    full_step()
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    trace = LiveTensorBytes()
    trace.track(list(model.parameters()) + states)
    with trace:
        full_step()
    return trace.peak

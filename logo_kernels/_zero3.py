"""DeepSpeed ZeRO-3 partitioned parameters: gather them for the duration of a direct access.

ZeRO-3 shards every parameter (``param.ds_id`` set, local data of ``numel`` 0) and re-materialises it only
inside its owning module's forward. A fused op that reads ``lm_head.weight`` directly must gather it, in the
forward and again in a backward that recomputes the logits. Nothing happens for ordinary tensors, nor for
parameters that are already available (e.g. gathered by an enclosing block, or tied embeddings).
"""
from __future__ import annotations

import contextlib

import torch


def is_partitioned(param) -> bool:
    """A ZeRO-3 parameter whose full data is not available right now."""
    if not isinstance(param, torch.Tensor) or not hasattr(param, "ds_id"):
        return False
    status = getattr(param, "ds_status", None)
    return status is None or getattr(status, "name", str(status)) != "AVAILABLE"


@contextlib.contextmanager
def gathered(*params):
    """Gathers the ZeRO-3 partitioned ``params`` for the block (no-op for anything else); read-only."""
    todo = {id(p): p for p in params if p is not None and is_partitioned(p)}
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None):
        yield

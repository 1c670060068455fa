"""Process setup for training: plain single-process torch, or DeepSpeed ZeRO across processes.

Launch with ``deepspeed --num_gpus N -m logo.train --deepspeed configs/zero3.json ...`` or
``torchrun --nproc_per_node N -m logo.train --deepspeed ...``; on CPU set ``DS_ACCELERATOR=cpu`` (gloo).
The shipped configs leave batch sizes, clipping and precision as ``"auto"``; :func:`deepspeed_config`
fills them from the training config so the two never disagree.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict

import torch

from .config import TrainConfig


@dataclass
class World:
    """This process's place: ``rank`` / ``size`` over all processes; ``data_rank`` / ``data_size`` over the
    data-parallel groups (the same unless sequence parallelism groups ranks: then every rank of a group reads the
    same rows)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    data_rank: int = None
    data_size: int = None

    def __post_init__(self):
        self.data_rank = self.rank if self.data_rank is None else self.data_rank
        self.data_size = self.size if self.data_size is None else self.data_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean(self, *values: float):
        """Means over ranks of the given floats, in one all-reduce (identity when single-process)."""
        if self.distributed:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA tensors only
            torch.distributed.all_reduce(t)
            values = tuple((t / self.size).tolist())
        return values[0] if len(values) == 1 else values

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce; also a barrier)."""
        if not self.distributed:
            return bool(ok)
        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t) == 0

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (one all-reduce)."""
        return not self.all_true(not flag)

    def from_main(self, value):
        """The main rank's ``value`` on every rank (a picklable object; identity when single-process)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, clean: bool = True) -> None:
        """Ends the process group; after a failure without the final barrier (the other ranks may be gone)."""
        if self.distributed and torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def init_world(config: TrainConfig) -> World:
    """Initialises torch.distributed through DeepSpeed when ``config.deepspeed`` is set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if config.deepspeed is None:
        if size > 1:
            raise RuntimeError(f"launched with WORLD_SIZE={size} but no --deepspeed config: multi-process training "
                               "runs on DeepSpeed ZeRO (e.g. --deepspeed configs/zero2.json)")
        return World(device=device)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, True)


def deepspeed_config(config: TrainConfig, world: World) -> Dict[str, Any]:
    """The DeepSpeed JSON config with its ``"auto"`` entries filled from ``config``."""
    with open(config.deepspeed, encoding="utf-8") as handle:
        ds = json.load(handle)
    auto = {"train_micro_batch_size_per_gpu": config.batch_rows, "gradient_accumulation_steps": config.grad_accum,
            "train_batch_size": config.batch_rows * config.grad_accum * world.data_size,
            "gradient_clipping": config.max_grad_norm}
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"{config.deepspeed}: {key}={ds[key]} disagrees with the training config ({value}); "
                             "set it to \"auto\"")
    for name, wanted in (("bf16", config.dtype == "bf16"), ("fp16", config.dtype == "fp16")):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # our torch AdamW also works with optimizer offload
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds_config: Dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def register_unhooked_parameters(model) -> int:
    """ZeRO-3 gathers a module's parameters when its forward runs; peft's LoRA on embeddings reads
    ``lora_embedding_A/B`` (held by ParameterDicts that never run) inside the embedding layer's forward.
    Registers them as external parameters of that layer so they are gathered too. Returns how many."""
    import deepspeed

    count = 0
    for module in model.modules():
        for name in ("lora_embedding_A", "lora_embedding_B"):
            for param in getattr(module, name, {}).values() if hasattr(module, name) else ():
                deepspeed.zero.register_external_parameter(module, param)
                count += 1
    return count

"""What differs between plain torch and DeepSpeed training, behind one small interface.

``make_engine(config, model, world)`` returns an object with ``model`` (what the forward runs), ``module``
(the causal LM itself, for export), ``backward(loss)`` (one micro-batch), ``step() -> grad norm`` (one
optimizer step after ``grad_accum`` micro-batches; raises :class:`NonFiniteGradient` before applying a
non-finite update where it can), ``lr``, ``save(root, step, keep)`` and ``load(path) -> step``.

Plain torch: AdamW + LambdaLR on the trainable parameters, gradient clipping, accumulation by scaling each
micro-batch's loss by 1 / grad_accum (every micro-batch has the same number of examples: a plain mean).
DeepSpeed: ``deepspeed.initialize`` with the same torch optimizer and scheduler and the config's "auto"
fields filled in; DeepSpeed accumulates, clips and steps.
"""
from __future__ import annotations

import math

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import World, deepspeed_config, register_unhooked_parameters, zero_stage
from .modeling import trainable_parameter_list
from .schedule import lr_lambda


class NonFiniteGradient(RuntimeError):
    def __init__(self, norm: float, applied: bool):
        self.norm, self.applied = norm, applied
        super().__init__(f"the gradient norm is {norm}")


def _optimizer_and_scheduler(config: TrainConfig, params):
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


class PlainEngine:
    description = "plain torch"

    def __init__(self, config: TrainConfig, model, world: World):
        self.model = self.module = model.to(world.device)
        self.params = trainable_parameter_list(model)
        self.optimizer, self.scheduler = _optimizer_and_scheduler(config, self.params)
        self.grad_accum, self.max_grad_norm, self.world = config.grad_accum, config.max_grad_norm, world

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf")))
        if not math.isfinite(norm):
            raise NonFiniteGradient(norm, applied=False)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def save(self, root: str, step: int, keep: int) -> str:
        return save_checkpoint(root, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               keep=keep, is_main=self.world.is_main, agree=self.world.all_true)

    def load(self, path: str) -> int:
        return load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)


class DeepSpeedEngine:
    def __init__(self, config: TrainConfig, model, world: World, mpu=None):
        import deepspeed

        self.params = trainable_parameter_list(model)
        optimizer, scheduler = _optimizer_and_scheduler(config, self.params)
        ds_config = deepspeed_config(config, world)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
        if zero_stage(ds_config) == 3:
            register_unhooked_parameters(self.engine.module)
        self.model, self.module, self.world = self.engine, self.engine.module, world
        self.description = f"DeepSpeed ZeRO-{zero_stage(ds_config)}" + (
            f", sequence parallel {config.sequence_parallel_size}" if config.sequence_parallel_size > 1 else "")

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed counts micro-batches and steps at the accumulation boundary

    def step(self) -> float:
        norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(norm):
            raise NonFiniteGradient(norm, applied=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def trainable_count(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.params)  # ZeRO-3 partitions hold 0 locally

    def save(self, root: str, step: int, keep: int) -> str:
        return save_checkpoint(root, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               engine=self.engine, keep=keep, is_main=self.world.is_main, agree=self.world.all_true)

    def load(self, path: str) -> int:
        return load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               engine=self.engine)


def make_engine(config: TrainConfig, model, world: World, mpu=None):
    return DeepSpeedEngine(config, model, world, mpu) if config.deepspeed else PlainEngine(config, model, world)

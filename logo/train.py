"""``python -m logo.train`` — the LOGO training loop, readable top to bottom.

    python -m logo.train                                   # embedded default: tiny Llama, synthetic task, CPU
    python -m logo.train --config configs/llama3-8b-80k.yaml --model /models/Llama-3-8B-Instruct-80K \\
        --train-file prefs.jsonl                           # a real run (see README "Training")
    python -m logo.train --help                            # every option with its default

One optimizer step = ``grad_accum`` micro-batches of ``batch_rows`` packed rows per process; every row is
one example ``[context | question | chosen | rejected_1..M]`` (the context encoded once), with position
ids synthesized over the target window. The loss is the fused LOGO loss on the scored hidden states only.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import List, Optional

import torch

from logo_kernels import LogoLoss

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_config, save_config
from .data.batching import PositionSynthesis, collate
from .data.encoding import EncodedExample, encode_records
from .data.records import read_preference_file, write_preference_file
from .distributed import World, deepspeed_config, init_world, register_unhooked_parameters, zero_stage
from .evaluate import preference_metrics, retrieval_exact_match
from .modeling import load_model, load_tokenizer, trainable_parameters
from .objective import packed_logo_loss


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: training stops before the optimizer step; the last checkpoint
    stays valid."""


# ----------------------------------------------------------------------------------------------- data
def load_records(config: TrainConfig, run_dir: str, world: World):
    """(train records, held-out records or []) from the files, or the synthetic task written as JSONL."""
    if config.train_file is not None:
        train = read_preference_file(config.train_file, config.num_negatives)
        heldout = read_preference_file(config.eval_file, config.num_negatives) if config.eval_file else []
        return train, heldout
    from .data.synthetic import make_kv_records

    data_dir = os.path.join(run_dir, "data")
    paths = {split: os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "heldout")}
    if world.is_main:
        os.makedirs(data_dir, exist_ok=True)
        sizes = {"train": config.synthetic_train, "heldout": config.synthetic_eval}
        for split, path in paths.items():
            write_preference_file(make_kv_records(sizes[split], split=split, seed=config.seed,
                                                  context_words=config.synthetic_context_words), path)
    world.barrier()
    train = read_preference_file(paths["train"], config.num_negatives)
    heldout = read_preference_file(config.eval_file, config.num_negatives) if config.eval_file else \
        read_preference_file(paths["heldout"], config.num_negatives)
    return train, heldout


def encode(records, tokenizer, config: TrainConfig) -> List[EncodedExample]:
    examples = encode_records(records, tokenizer, num_negatives=config.num_negatives,
                              use_chat_template=config.use_chat_template, max_context_tokens=config.max_context_tokens,
                              max_response_tokens=config.max_response_tokens)
    if config.window is not None:
        for e in examples:
            real = len(e.prompt) + max(len(r) for r in e.responses)
            if real > config.window:
                raise ValueError(f"record {e.id!r}: {real} real tokens do not fit the position window "
                                 f"{config.window}; lower max_context_tokens/max_response_tokens or raise window")
    return examples


def micro_batch(examples: List[EncodedExample], index: int, config: TrainConfig, world: World, pad_token_id: int):
    """This rank's rows of global micro-batch ``index``: a pure function of the index, so resuming is exact.
    The data stream is a fresh seeded permutation of the examples per epoch; the positions of stream item k
    are drawn from a generator seeded by k, so they do not depend on batch size, accumulation or world size
    (1 process x 2 rows and 2 processes x 1 row see the same rows)."""
    rows = config.batch_rows * world.size
    first = index * rows + world.rank * config.batch_rows
    picked, generators = [], []
    for k in range(first, first + config.batch_rows):
        epoch, offset = divmod(k, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        picked.append(examples[int(order[offset])])
        generators.append(torch.Generator().manual_seed(config.seed * 1000003 + k))
    return collate(picked, pad_token_id=pad_token_id, synthesis=synthesis_of(config), generator=generators)


def synthesis_of(config: TrainConfig) -> PositionSynthesis:
    return PositionSynthesis(config.window, config.chunk_tokens, config.position_strategy, config.continuous_ratio)


# ------------------------------------------------------------------------------------------ optimizer
def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# --------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl + TensorBoard events in the run directory (main rank only)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("logo.train: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
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


def evaluate(model, tokenizer, heldout, loss_fn, config: TrainConfig, world: World) -> dict:
    if not heldout:
        return {}
    metrics = preference_metrics(model, heldout, loss_fn, pad_token_id=tokenizer.pad_token_id,
                                 synthesis=synthesis_of(config), batch_rows=config.batch_rows)
    metrics.update(retrieval_exact_match(model, tokenizer, heldout, synthesis=synthesis_of(config),
                                         max_new_tokens=config.eval_max_new_tokens, early_stop=not world.distributed))
    return metrics


def describe(metrics: dict) -> str:
    parts = [f"preference accuracy {metrics['accuracy']:.1%}"]
    parts += [f"vs rejected[{k.rsplit('_', 1)[1]}] {v:.1%}" for k, v in metrics.items() if k.startswith("accuracy_")]
    parts += [f"retrieval exact match {metrics['exact_match']:.1%}", f"loss {metrics['loss']:.3f}"]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ main
def train(config: TrainConfig) -> dict:
    """Runs the training described by ``config``; returns {"before": eval, "after": eval, "steps": n}."""
    world = init_world(config)
    run_dir = config.output_dir
    if world.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(config, os.path.join(run_dir, "config.json"))
    world.barrier()
    torch.manual_seed(config.seed)

    tokenizer = load_tokenizer(config, save_dir=os.path.join(run_dir, "tokenizer") if world.is_main else None)
    train_records, heldout_records = load_records(config, run_dir, world)
    train_examples, heldout = encode(train_records, tokenizer, config), encode(heldout_records, tokenizer, config)
    if not train_examples:
        raise ValueError(f"no training examples in {config.train_file or 'the synthetic task'} "
                         "(synthetic_train must be >= 1)")
    model = load_model(config, tokenizer)
    if not config.deepspeed:
        model.to(world.device)
    loss_fn = LogoLoss(num_negatives=config.num_negatives, beta=config.beta, gamma=config.gamma,
                       sft_weight=config.sft_weight, loss_type=config.loss_type,
                       label_smoothing=config.label_smoothing, backend=config.loss_backend)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    engine = None
    if config.deepspeed:
        import deepspeed

        ds_config = deepspeed_config(config, world)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_config)
        if zero_stage(ds_config) == 3:
            register_unhooked_parameters(engine.module)
        model = engine
    if world.is_main:
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 partitions hold 0 locally
        print(f"logo.train: {len(train_examples)} training / {len(heldout)} held-out examples, "
              f"M={config.num_negatives}, {n_train:,} trainable parameters, world size {world.size}, "
              f"{'DeepSpeed ZeRO-%d' % zero_stage(ds_config) if engine else 'plain torch'} on {world.device}")

    checkpoints = os.path.join(run_dir, "checkpoints")
    start_step = 0
    if config.resume:
        path = latest_checkpoint(checkpoints)
        if path is None:
            print(f"logo.train: --resume but no checkpoint in {checkpoints}; starting from step 0", file=sys.stderr)
        else:
            start_step = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine)
            if world.is_main:
                print(f"logo.train: resumed from {path} (step {start_step})")
    log = MetricsLog(run_dir, world.is_main)
    results = {"before": {}, "after": {}}
    if start_step == 0 and heldout:
        results["before"] = evaluate(model, tokenizer, heldout, loss_fn, config, world)
        log.write(0, "eval", results["before"])
        if world.is_main and results["before"]:
            print(f"held-out before training: {describe(results['before'])}")

    save = lambda step: save_checkpoint(checkpoints, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                        engine=engine, keep=config.keep_checkpoints, is_main=world.is_main,
                                        barrier=world.barrier)
    bar = None
    if world.is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start_step, desc="LOGO", dynamic_ncols=True)
    def stop(what: str):
        raise TrainingDiverged(f"{what}; stopped before the optimizer step. Last good checkpoint: "
                               f"{latest_checkpoint(checkpoints) or 'none'} (lower the learning rate, use fp32/bf16 "
                               "instead of fp16, or check the data)")

    end_step = config.max_steps if config.stop_after is None else min(config.max_steps, start_step + config.stop_after)
    model.train()
    for step in range(start_step, end_step):
        started = time.perf_counter()
        sums = {"loss": 0.0, "sft_loss": 0.0, "margin": 0.0, "accuracy": 0.0}
        tokens = 0
        for micro in range(config.grad_accum):
            batch = micro_batch(train_examples, step * config.grad_accum + micro, config, world, tokenizer.pad_token_id)
            batch.input_ids, batch.position_ids = batch.input_ids.to(world.device), batch.position_ids.to(world.device)
            batch.score_index, batch.targets = batch.score_index.to(world.device), batch.targets.to(world.device)
            batch.cu_seqlens = batch.cu_seqlens.to(world.device)
            out = packed_logo_loss(model, batch, loss_fn)
            loss_value, sft, margin, accuracy = world.mean(float(out.loss.detach()), float(out.sft_loss),
                                                           float(out.margins.mean()), float(out.accuracy))
            if not math.isfinite(loss_value):
                stop(f"step {step + 1}: the loss is {loss_value}")
            if engine is not None:
                engine.backward(out.loss)
                engine.step()
            else:
                (out.loss / config.grad_accum).backward()  # every micro-batch has batch_rows examples: a plain mean
            for name, value in zip(sums, (loss_value, sft, margin, accuracy)):
                sums[name] += value / config.grad_accum
            tokens += int(batch.input_ids.numel())
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
            if not math.isfinite(grad_norm):
                stop(f"step {step + 1}: the gradient norm is {grad_norm}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        metrics = dict(sums, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],
                       tokens_per_s=world.size * tokens / elapsed)
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            log.write(step + 1, "train", metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", margin=f"{sums['margin']:.2f}", acc=f"{sums['accuracy']:.2f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < end_step:
            save(step + 1)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps and heldout:
            log.write(step + 1, "eval", evaluate(model, tokenizer, heldout, loss_fn, config, world))
    if bar is not None:
        bar.close()
    results["steps"] = end_step - start_step
    if end_step > start_step:
        save(end_step)
    if end_step < config.max_steps:
        if world.is_main:
            print(f"logo.train: stopped after step {end_step} of {config.max_steps} (--stop-after); continue with "
                  f"--resume --output-dir {run_dir}")
        log.close()
        world.close()
        return results
    export_final(model, tokenizer, os.path.join(run_dir, "final"), world, engine)
    if heldout:
        results["after"] = evaluate(model, tokenizer, heldout, loss_fn, config, world)
        log.write(config.max_steps, "eval", results["after"])
        if world.is_main and results["after"]:
            print(f"held-out after training:  {describe(results['after'])}")
            if results["before"]:
                gain = results["after"]["accuracy"] - results["before"]["accuracy"]
                print(f"preference accuracy {results['before']['accuracy']:.1%} -> {results['after']['accuracy']:.1%} "
                      f"({gain * 100:+.1f} points); exact match {results['before']['exact_match']:.1%} -> "
                      f"{results['after']['exact_match']:.1%}")
    if world.is_main:
        with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        print(f"logo.train: run directory {run_dir} (config.json, metrics.jsonl, tensorboard/, checkpoints/, final/)")
    log.close()
    world.close()
    return results


def export_final(model, tokenizer, path: str, world: World, engine=None) -> None:
    """The trained model (or LoRA adapter) and tokenizer in Hugging Face format, written atomically."""
    from logo_kernels.integrations.hf import gathered

    module = engine.module if engine is not None else model
    params = [p for p in module.parameters() if p.requires_grad] if hasattr(module, "peft_config") else \
        list(module.parameters())
    tmp = f"{path}.tmp"
    with gathered(*params):
        if world.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    world.barrier()


def main(argv: Optional[List[str]] = None) -> int:
    config, explicit = parse_config(argv)
    if config.embedded:
        print("logo.train: embedded default run (tiny Llama from config, offline tokenizer, synthetic key-value "
              "retrieval over shipped text); pass --model PATH for a real model", file=sys.stderr)
    try:
        train(config)
    except TrainingDiverged as error:
        print(f"logo.train: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

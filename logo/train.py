"""``python -m logo.train`` — the LOGO training loop, readable top to bottom.

    python -m logo.train                                   # embedded default: tiny Llama, synthetic task, CPU
    python -m logo.train --config configs/llama3-8b-instruct-80k.yaml --model /models/Llama-3-8B-Instruct-80K \\
        --train-file prefs.jsonl                           # a real run (see README "Training")
    python -m logo.train --help                            # every option with its default

One optimizer step = ``grad_accum`` micro-batches of ``batch_rows`` packed rows per process; every row is
one example ``[context | question | chosen | rejected_1..M]`` (the context encoded once), with position
ids synthesized over the target window. The loss is the fused LOGO loss on the scored hidden states only.
A user error (bad option, missing file, a run directory that would be overwritten or is in use) exits with code 2
and one line; a diverging run (non-finite loss or gradient) with code 3, keeping its last checkpoint; an output the
OS refuses to write (no space left, permission denied) with code 4, naming the path and the last complete
checkpoint; SIGTERM / SIGINT finish the current step, write a checkpoint and exit with code 75 (resume with
``--resume``; a second signal exits at once).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import List, Optional

import torch

from logo_kernels import LogoLoss
from logo_kernels.integrations.hf import unwrap_causal_lm

from .checkpoint import last_complete, latest_checkpoint
from .config import TrainConfig, parse_config
from .distributed import World, init_world
from .engine import NonFiniteGradient, make_engine
from .errors import StorageError, run_cli, writing
from .evaluate import EVAL_SEED, preference_metrics, retrieval_exact_match
from .files import write_atomically, write_json_atomically
from .metrics_log import MetricsLog
from .modeling import export_final, load_model, load_tokenizer
from .objective import packed_logo_loss
from .preemption import PREEMPTED_EXIT, StopRequest
from . import sequence_parallel
from .run_dir import RunDirectory
from .train_data import encode, load_records, micro_batch, synthesis_of
from .warmup import base_warmup


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: training stops (before the optimizer step where it can); the last
    checkpoint stays valid."""


def make_loss(config: TrainConfig) -> LogoLoss:
    return LogoLoss(num_negatives=config.num_negatives, beta=config.beta, gamma=config.gamma,
                    sft_weight=config.sft_weight, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                    backend=config.loss_backend, filter_eps=filter_eps_option(config.loss_filter_eps))


def filter_eps_option(field):
    """The config's loss_filter_eps string as linear_logprobs takes it (None, "auto" or a float)."""
    return None if field is None else (field if field == "auto" else float(field))


def evaluate(model, tokenizer, heldout, loss_fn, config: TrainConfig, world: World, run_dir: str = None,
             tag: str = "") -> dict:
    """Held-out preference metrics and greedy exact match (synthesized positions), and with ``eval_niah_lengths``
    needle-in-a-haystack at real context lengths (``logo.eval.niah``; heatmap and CSV under ``run_dir/eval``)."""
    metrics = {}
    if heldout:
        metrics = preference_metrics(model, heldout, loss_fn, pad_token_id=tokenizer.pad_token_id,
                                     synthesis=synthesis_of(config), batch_rows=config.batch_rows)
        metrics.update(retrieval_exact_match(model, tokenizer, heldout, synthesis=synthesis_of(config),
                                             max_new_tokens=config.eval_max_new_tokens,
                                             early_stop=not world.distributed))
    if config.eval_niah_lengths:
        metrics["niah"] = niah_evaluation(unwrap_causal_lm(model), tokenizer, config, world, run_dir, tag)
    return metrics


def niah_evaluation(model, tokenizer, config: TrainConfig, world: World, run_dir: str, tag: str) -> dict:
    """Single-needle and multi-value NIAH (as many values as the synthetic task's keys hold) at the configured
    real lengths; returns recall / exact match per mode and length."""
    from .eval import niah

    options = niah.NiahOptions(lengths=tuple(config.eval_niah_lengths), depths=(0.0, 0.5, 1.0),
                               values=max(2, config.synthetic_values), samples=config.eval_niah_samples,
                               format=config.eval_niah_format, max_new_tokens=config.eval_max_new_tokens,
                               seed=EVAL_SEED)  # the same cases whatever the training seed
    was_training = model.training
    model.eval()
    result = niah.run(model, tokenizer, options, progress=False)
    model.train(was_training)
    if world.is_main and run_dir is not None:
        with writing(os.path.join(run_dir, "eval")):
            write_niah_files(result, os.path.join(run_dir, "eval"), tag)
    return {f"{c['mode']}_{c['length']}": {"recall": c["recall"], "exact_match": c["exact_match"]}
            for c in result["cells"] if c["depth"] == "all"}


def write_niah_files(result: dict, directory: str, tag: str) -> None:
    """The NIAH heatmap and cells of one evaluation, each written atomically."""
    import csv

    from .eval import niah

    os.makedirs(directory, exist_ok=True)
    figure = niah.heatmap(result["cells"], title=tag)
    write_atomically(os.path.join(directory, f"niah-{tag}.png"),
                     lambda path: figure.savefig(path, dpi=110, bbox_inches="tight", format="png"))

    def write_csv(path):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result["cells"][0]))
            writer.writeheader()
            writer.writerows(result["cells"])
    write_atomically(os.path.join(directory, f"niah-{tag}.csv"), write_csv)


def describe(metrics: dict) -> str:
    parts = []
    if "accuracy" in metrics:
        parts.append(f"preference accuracy {metrics['accuracy']:.1%}")
        parts += [f"vs rejected[{k.rsplit('_', 1)[1]}] {v:.1%}" for k, v in metrics.items()
                  if k.startswith("accuracy_")]
        parts += [f"retrieval exact match {metrics['exact_match']:.1%}", f"loss {metrics['loss']:.3f}"]
    if "niah" in metrics:
        parts.append("NIAH recall " + ", ".join(f"{k} {v['recall']:.0%}" for k, v in metrics["niah"].items()))
    return ", ".join(parts)


def train_step(step: int, engine, examples, loss_fn, config: TrainConfig, world: World, pad_token_id: int,
               checkpoints: str, sp=None) -> dict:
    """One optimizer step (``grad_accum`` micro-batches); returns its metrics (means over ranks)."""
    started = time.perf_counter()
    sums = {"loss": 0.0, "sft_loss": 0.0, "margin": 0.0, "accuracy": 0.0}
    tokens = 0
    for micro in range(config.grad_accum):
        batch = micro_batch(examples, step * config.grad_accum + micro, config, world, pad_token_id).to(world.device)
        out = packed_logo_loss(engine.model, batch, loss_fn, sequence_parallel=sp, pad_token_id=pad_token_id)
        values = world.mean(float(out.loss.detach()), float(out.sft_loss), float(out.margins.mean()),
                            float(out.accuracy))
        if not math.isfinite(values[0]):
            raise TrainingDiverged(f"step {step + 1}: the loss is {values[0]}; stopped before the optimizer step. "
                                   + _last_good(checkpoints))
        engine.backward(out.loss)
        for name, value in zip(sums, values):
            sums[name] += value / config.grad_accum
        tokens += int(batch.input_ids.numel())
    try:
        grad_norm = engine.step()
    except NonFiniteGradient as error:
        when = "after" if error.applied else "before"
        raise TrainingDiverged(f"step {step + 1}: {error}; stopped {when} the optimizer step. "
                               + _last_good(checkpoints)) from None
    return dict(sums, grad_norm=grad_norm, lr=engine.lr,
                tokens_per_s=world.data_size * tokens / (time.perf_counter() - started))


def _last_good(checkpoints: str) -> str:
    return (f"Last good checkpoint: {latest_checkpoint(checkpoints) or 'none'} (lower the learning rate, use "
            "fp32/bf16 instead of fp16, or check the data)")


def train(config: TrainConfig) -> dict:
    """Runs the training described by ``config``; returns {"before": eval, "after": eval, "steps": n}."""
    config.check_paths()
    world = init_world(config)
    log, failed, run = None, True, None
    stop = StopRequest().install()
    try:
        # setup: run directory (locked), data, model, engine, resume point
        run = RunDirectory(config, world)
        run.prepare()
        if config.embedded and world.is_main:
            print("logo.train: embedded default run (tiny Llama from config, offline tokenizer, synthetic key-value "
                  "retrieval over shipped text); pass --model PATH for a real model", file=sys.stderr)
        torch.manual_seed(config.seed)  # LoRA initialisation draws from it
        with writing(os.path.join(run.path, "tokenizer")):
            tokenizer = load_tokenizer(config, save_dir=os.path.join(run.path, "tokenizer") if world.is_main else None)
        with writing(os.path.join(run.path, "data")):
            train_records, heldout_records = load_records(config, run.path, world)
        examples, heldout = encode(train_records, tokenizer, config), encode(heldout_records, tokenizer, config)
        model = load_model(config, tokenizer)
        sp = sequence_parallel.setup(model, config.sequence_parallel_size, config.batch_rows, world)
        if sp is not None:  # every rank of a group reads the same rows
            world.data_rank, world.data_size = sp.data_parallel_rank, sp.data_parallel_size
        engine = make_engine(config, model, world, mpu=None if sp is None else sp.mpu)
        loss_fn = make_loss(config)
        start = resume(config, run, engine, world)
        run.truncate_metrics(start)
        with writing(os.path.join(run.path, "tensorboard")):
            log = MetricsLog(run.path, world.is_main, purge_step=start + 1 if start else None)
        if start == 0 and (config.warmup_copy_steps or config.warmup_sft_steps):
            warm_up_base_model(engine, examples, config, tokenizer, log, world)
        if world.is_main:
            print(f"logo.train: {len(examples)} training / {len(heldout)} held-out examples, M={config.num_negatives}, "
                  f"{engine.trainable_count():,} trainable parameters, world size {world.size}, "
                  f"{engine.description} on {world.device}")
        results = {"before": {}, "after": {}, "longest_training_context": max(len(e.context) for e in examples)}
        if start == 0 and (heldout or config.eval_niah_lengths):
            results["before"] = evaluate(engine.model, tokenizer, heldout, loss_fn, config, world, run.path, "before")
            log.write(0, "eval", results["before"])
            if world.is_main and results["before"]:
                print(f"held-out before training: {describe(results['before'])}")

        # the loop
        end = config.max_steps if config.stop_after is None else min(config.max_steps, start + config.stop_after)
        bar = progress_bar(config, world, start)
        engine.model.train()
        stopped = False
        for step in range(start, end):
            if world.any_true(stop.signal is not None):  # every rank stops before the same step
                end, stopped = step, True
                break
            metrics = train_step(step, engine, examples, loss_fn, config, world, tokenizer.pad_token_id,
                                 run.checkpoints, sp)
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                log.write(step + 1, "train", metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['margin']:.2f}",
                                acc=f"{metrics['accuracy']:.2f}")
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < end:
                engine.save(run.checkpoints, step + 1, config.keep_checkpoints)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps and heldout:
                log.write(step + 1, "eval", evaluate(engine.model, tokenizer, heldout, loss_fn, config, world,
                                                     run.path, f"step-{step + 1}"))
        if bar is not None:
            bar.close()

        # finish: checkpoint, (at max_steps) export, evaluation, results.json
        results["steps"] = end - start
        if stopped:
            results["stopped_by"] = stop.name or "a signal on another rank"
        finish(results, start, end, engine, tokenizer, heldout, loss_fn, config, world, run, log)
        if log is not None:
            log.close()
        failed = False
        return results
    except StorageError as error:
        error.with_intact(_intact(run))
        if run is not None and os.path.isdir(run.checkpoints):
            error.with_hint(f"continue with --resume --output-dir {run.path} once the cause is fixed")
        raise error from None
    finally:
        stop.restore()
        if log is not None:
            log.close(quietly=True)
        if run is not None:
            run.close()
        world.close(clean=not failed)


def _intact(run: Optional[RunDirectory]) -> str:
    return "no checkpoint was written yet" if run is None else last_complete(run.checkpoints)


def warm_up_base_model(engine, examples, config: TrainConfig, tokenizer, log: MetricsLog, world: World) -> None:
    """The embedded toy's base-model stages (copy curriculum, then SFT) before LOGO (:mod:`logo.warmup`)."""
    summary = base_warmup(engine.module, examples, config, tokenizer.pad_token_id, engine.module.config.vocab_size,
                          world.device, lambda row: log.write(0, "warmup", row), progress=config.progress)
    if world.is_main:
        print(f"logo.train: base model warm-up: copy curriculum {summary['copy_steps']} steps (loss "
              f"{summary['copy_loss'] or 0:.3f}), SFT {summary['sft_steps']} steps (loss "
              f"{summary['sft_loss'] or 0:.3f})")


def finish(results: dict, start: int, end: int, engine, tokenizer, heldout, loss_fn, config: TrainConfig,
           world: World, run: RunDirectory, log: MetricsLog) -> None:
    """The last checkpoint; at ``max_steps`` also the exported model, the final evaluation and results.json."""
    if end > start:
        engine.save(run.checkpoints, end, config.keep_checkpoints)
    if end < config.max_steps:
        if world.is_main:
            why = results.get("stopped_by", "--stop-after")
            saved = f"checkpoint step-{end} written" if end > start else "no new step to checkpoint"
            print(f"logo.train: stopped after step {end} of {config.max_steps} ({why}; {saved}); continue with "
                  f"--resume --output-dir {run.path}", file=sys.stderr if "stopped_by" in results else sys.stdout,
                  flush=True)
        return
    export_final(engine.module, tokenizer, os.path.join(run.path, "final"), world)
    if heldout or config.eval_niah_lengths:
        results["after"] = evaluate(engine.model, tokenizer, heldout, loss_fn, config, world, run.path, "after")
        log.write(config.max_steps, "eval", results["after"])
        report(results, world)
    if world.is_main:
        with writing(os.path.join(run.path, "results.json")):
            write_json_atomically(os.path.join(run.path, "results.json"), results)
        print(f"logo.train: run directory {run.path} (config.json, metrics.jsonl, tensorboard/, checkpoints/, "
              "final/)")


def resume(config: TrainConfig, run: RunDirectory, engine, world: World) -> int:
    """The step to start from: 0, or with ``--resume`` that of the newest checkpoint (restored into ``engine``)."""
    if not config.resume:
        return 0
    path = latest_checkpoint(run.checkpoints)
    if path is None:
        if world.is_main:
            print(f"logo.train: --resume but no checkpoint in {run.checkpoints}; starting from step 0", file=sys.stderr)
        return 0
    step = engine.load(path)
    if world.is_main:
        print(f"logo.train: resumed from {path} (step {step})")
    return step


def progress_bar(config: TrainConfig, world: World, start: int):
    if not (world.is_main and config.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=start, desc="LOGO", dynamic_ncols=True)


def report(results: dict, world: World) -> None:
    if not world.is_main or not results["after"]:
        return
    print(f"held-out after training:  {describe(results['after'])}")
    before, after = results["before"], results["after"]
    if before and "accuracy" in before:
        gain = after["accuracy"] - before["accuracy"]
        print(f"preference accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} ({gain * 100:+.1f} points); "
              f"exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}")
    if before and "niah" in before:
        print(niah_table(before["niah"], after["niah"], results.get("longest_training_context")))


def niah_table(before: dict, after: dict, longest_training_context: int = None) -> str:
    """NIAH recall / exact match before -> after training, per mode and real context length."""
    seen = f"; the longest context trained on: {longest_training_context} tokens" if longest_training_context else ""
    lines = [f"needle-in-a-haystack at real context lengths (before -> after training{seen}):",
             f"  {'mode':<8}{'context':>8}  {'recall':>17}  {'exact match':>17}"]
    for key in before:
        mode, length = key.rsplit("_", 1)
        b, a = before[key], after.get(key, {})
        lines.append(f"  {mode:<8}{length:>8}  {b['recall']:>6.1%} -> {a.get('recall', float('nan')):>6.1%}"
                     f"   {b['exact_match']:>6.1%} -> {a.get('exact_match', float('nan')):>6.1%}")
    return "\n".join(lines)


def _main(argv: List[str]) -> int:
    config, _ = parse_config(argv)
    try:
        results = train(config)
    except TrainingDiverged as error:
        print(f"logo.train: {error}", file=sys.stderr)
        return 3
    return PREEMPTED_EXIT if "stopped_by" in results else 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("logo.train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

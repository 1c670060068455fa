"""The training data of ``logo.train``: records (user files or the synthetic task), token ids, and the packed
micro-batches each rank sees, as a pure function of the step (so a resumed run sees exactly the same data)."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch

from .config import TrainConfig
from .data.batching import PositionSynthesis, collate
from .data.encoding import EncodedExample, encode_records
from .data.records import read_preference_file, write_preference_file
from .distributed import World
from .errors import ConfigError

# Large primes: runs with neighbouring seeds must not share data orders or positions.
_ORDER_STRIDE = 100003
_POSITIONS_STRIDE = 1000003


def epoch_order_seed(seed: int, epoch: int) -> int:
    """Seed of the permutation of the training examples in ``epoch``."""
    return seed * _ORDER_STRIDE + epoch


def positions_seed(seed: int, item: int) -> int:
    """Seed of the synthesized positions of stream item ``item`` (independent of batch size and world size)."""
    return seed * _POSITIONS_STRIDE + item


def load_records(config: TrainConfig, run_dir: str, world: World) -> Tuple[list, list]:
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
            records = make_kv_records(sizes[split], split=split, seed=config.seed,
                                      context_words=config.synthetic_context_words, num_keys=config.synthetic_keys,
                                      max_values_per_key=config.synthetic_values)
            if records:
                write_preference_file(records, path)
    world.barrier()
    train = read_preference_file(paths["train"], config.num_negatives)
    if config.eval_file:
        return train, read_preference_file(config.eval_file, config.num_negatives)
    return train, read_preference_file(paths["heldout"], config.num_negatives) if config.synthetic_eval else []


def encode(records, tokenizer, config: TrainConfig) -> List[EncodedExample]:
    examples = encode_records(records, tokenizer, num_negatives=config.num_negatives,
                              use_chat_template=config.use_chat_template, max_context_tokens=config.max_context_tokens,
                              max_response_tokens=config.max_response_tokens)
    if config.window is not None:
        for e in examples:
            real = len(e.prompt) + max(len(r) for r in e.responses)
            if real > config.window:
                raise ConfigError(f"record {e.id!r}: {real} real tokens do not fit the position window "
                                  f"{config.window}; lower max_context_tokens/max_response_tokens or raise window")
    return examples


def synthesis_of(config: TrainConfig) -> PositionSynthesis:
    return PositionSynthesis(config.window, config.chunk_tokens, config.position_strategy, config.continuous_ratio)


def micro_batch(examples: List[EncodedExample], index: int, config: TrainConfig, world: World, pad_token_id: int):
    """This rank's rows of global micro-batch ``index``: a pure function of the index, so resuming is exact.
    The data stream is a fresh seeded permutation of the examples per epoch; the positions of stream item k
    are drawn from a generator seeded by k, so they do not depend on batch size, accumulation or world size
    (1 process x 2 rows and 2 processes x 1 row see the same rows)."""
    rows = config.batch_rows * world.data_size
    first = index * rows + world.data_rank * config.batch_rows  # every rank of a sequence-parallel group: same rows
    picked, generators = [], []
    for k in range(first, first + config.batch_rows):
        epoch, offset = divmod(k, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(epoch_order_seed(config.seed,
                                                                                                      epoch)))
        picked.append(examples[int(order[offset])])
        generators.append(torch.Generator().manual_seed(positions_seed(config.seed, k)))
    return collate(picked, pad_token_id=pad_token_id, synthesis=synthesis_of(config), generator=generators)

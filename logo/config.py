"""The typed training configuration of ``python -m logo.train``: defaults, YAML/JSON file, CLI overrides.

Defaults follow the paper's recipe for real models (arXiv 2410.18533 and the authors' release: M=2, beta=10,
gamma=3, lambda=0.1, LoRA r32/alpha16/dropout 0 on q,k,v,o + embeddings, bf16, gradient checkpointing, a 64K
window of 16x512 chunks). Without ``--model`` the run is the embedded default (a tiny Llama from config on the synthetic
retrieval task), and :data:`EMBEDDED_DEFAULTS` replace the options the user did not set.
Precedence: dataclass default < embedded default (no model) < ``--config`` file < command line.

Every field declares its class — type, range (``low``/``high``, open or closed), choices — and
:meth:`TrainConfig.validate` checks all of them (and the combinations) with a :class:`~logo.errors.ConfigError`
naming the field; booleans are never accepted as numbers, NaN and inf never as values. Fields also declare
whether ``--resume`` may change them (``resume="free"``: how long and how visibly the run goes on) or not
(the default: anything that changes what the run computes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError, InputFileError
from .files import write_json_atomically


def _opt(default, help: str, choices: Sequence = None, *, low=None, high=None, low_open=False, high_open=False,
         resume: str = "fixed"):
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open, "resume": resume})


@dataclass
class TrainConfig:
    # model
    model: Optional[str] = _opt(None, "local Hugging Face model directory (AutoModelForCausalLM); unset = the "
                                      "embedded tiny Llama")
    tokenizer: Optional[str] = _opt(None, "tokenizer directory (default: --model; embedded: trained offline)")
    dtype: str = _opt("bf16", "parameter/compute dtype", ("bf16", "fp16", "fp32"))
    attn_implementation: str = _opt("sdpa", "attention of non-packed passes (eval, generation); packed rows "
                                            "always use shared-prefix attention", ("sdpa", "eager",
                                                                                    "flash_attention_2", "flex_attention"),
                                    resume="free")
    rope_theta: Optional[float] = _opt(None, "override the model's RoPE base (paper: 2e8 for Llama-3-8B-8K)",
                                       low=0, low_open=True)
    max_position_embeddings: Optional[int] = _opt(None, "override the model's max_position_embeddings", low=1)
    gradient_checkpointing: bool = _opt(True, "recompute decoder layers in the backward", resume="free")
    finetune: str = _opt("lora", "LoRA adapters (peft) or full fine-tuning", ("lora", "full"))
    lora_r: int = _opt(32, "LoRA rank", low=1)
    lora_alpha: int = _opt(16, "LoRA alpha", low=1)
    lora_dropout: float = _opt(0.0, "LoRA dropout (the recipe disables dropout)", low=0, high=1, high_open=True)
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,embed_tokens",
                             "comma-separated module names that get LoRA adapters")
    # embedded model shape (only without --model)
    tiny_hidden_size: int = _opt(128, "embedded model: hidden size", low=2)
    tiny_layers: int = _opt(2, "embedded model: decoder layers", low=1)
    tiny_heads: int = _opt(4, "embedded model: attention heads (2 key/value heads)", low=1)
    # data
    train_file: Optional[str] = _opt(None, "preference JSONL (logo.data.records); unset = synthetic task")
    eval_file: Optional[str] = _opt(None, "held-out preference JSONL; unset = synthetic held-out split "
                                          "(with a train file: no evaluation)", resume="free")
    synthetic_train: int = _opt(512, "synthetic task: training records", low=1)
    synthetic_eval: int = _opt(64, "synthetic task: held-out records", low=0, resume="free")
    synthetic_context_words: int = _opt(1000, "synthetic task: words of filler text per context", low=1)
    synthetic_keys: int = _opt(4, "synthetic task: keys hidden per context (one is asked)", low=2, high=24)
    synthetic_values: int = _opt(2, "synthetic task: values per key at most", low=1, high=10)
    use_chat_template: bool = _opt(True, "use the tokenizer's chat template (else the plain template)")
    max_context_tokens: Optional[int] = _opt(16 * 512, "cut longer contexts in the middle (paper: 16 x 512)", low=1)
    max_response_tokens: Optional[int] = _opt(512, "cut longer responses", low=1)
    window: Optional[int] = _opt(65536, "positional indices synthesis: target window K (unset: no synthesis)", low=2)
    chunk_tokens: int = _opt(512, "positional indices synthesis: chunk size", low=1)
    position_strategy: str = _opt("mixed", "positional indices synthesis strategy",
                                  ("continuous", "sparse", "slots", "mixed"))
    continuous_ratio: float = _opt(0.9, "share of 'continuous' samples in the 'mixed' strategy", low=0, high=1)
    # objective
    num_negatives: int = _opt(2, "M, rejected responses per example", low=1)
    beta: float = _opt(10.0, "reward scale beta", low=0, low_open=True)
    gamma: float = _opt(3.0, "target reward margin gamma")
    sft_weight: float = _opt(0.1, "lambda, weight of the SFT (chosen NLL) term", low=0)
    loss_type: str = _opt("sigmoid", "LOGO loss form: -log sigmoid(z) (paper) or hinge relu(1 - z)",
                          ("sigmoid", "hinge"))
    label_smoothing: float = _opt(0.0, "label smoothing of the sigmoid loss", low=0, high=0.5, high_open=True)
    loss_backend: str = _opt("auto", "fused op backend", ("auto", "torch", "cpp", "triton"), resume="free")
    loss_filter_eps: Optional[str] = _opt(None, "gradient filtering of the fused op (docs/filtering.md): unset = exact; "
                                                "'auto' (2^-12 at bf16) or a float in (0, 2^-7]", resume="free")
    # optimisation
    learning_rate: float = _opt(5e-7, "peak learning rate (the authors' release: 5e-7; their experiments span "
                                      "1e-6 .. 1e-4)", low=0, low_open=True)
    lr_schedule: str = _opt("warmup_constant", "warmup_constant: DeepSpeed WarmupLR's log-shaped warm-up then "
                                               "constant (the authors' runs); cosine / constant: linear warm-up, then "
                                               "cosine to 0 or constant", ("warmup_constant", "cosine", "constant"))
    warmup_steps: int = _opt(120, "warm-up steps (the authors': 120 of 1200)", low=0)
    weight_decay: float = _opt(0.05, "AdamW weight decay (the authors': 0.05)", low=0)
    adam_betas: Tuple[float, float] = _opt((0.9, 0.999), "AdamW betas (the authors' DeepSpeed AdamW)", low=0, high=1,
                                           high_open=True)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", low=0, low_open=True)
    max_grad_norm: float = _opt(1.0, "gradient clipping (0: off; the authors' ZeRO-3 runs did not clip)", low=0)
    max_steps: int = _opt(1200, "optimizer steps (the authors': 1200; global batch 64)", low=1, resume="free")
    batch_rows: int = _opt(1, "packed rows (examples) per device per micro-batch", low=1)
    grad_accum: int = _opt(8, "micro-batches per optimizer step", low=1)
    seed: int = _opt(42, "seed of model init, data order, positions", low=0, high=2**31 - 1)
    # base-model warm-up (the embedded toy builds its own base model; 0 for a real model)
    warmup_copy_steps: int = _opt(0, "copy-curriculum steps before anything else (random-token sequences whose "
                                     "repeats teach induction heads; stops early once learned)", low=0)
    warmup_sft_steps: int = _opt(0, "SFT steps on the chosen responses with plain positions, making the base model "
                                    "LOGO starts from", low=0)
    warmup_lr: float = _opt(1e-3, "learning rate of the warm-up stages", low=0, low_open=True)
    # needle-in-a-haystack before / after training (logo.eval.niah)
    eval_niah_lengths: Tuple[int, ...] = _opt((), "real context lengths (tokens) of the NIAH evaluation before and "
                                                  "after training (empty: none)", low=16, resume="free")
    eval_niah_samples: int = _opt(8, "NIAH samples per (mode, length, depth)", low=1, resume="free")
    eval_niah_format: str = _opt("ruler", "NIAH needles: ruler (magic numbers) or kv (the synthetic task's pairs)",
                                 ("ruler", "kv"), resume="free")
    # distributed
    deepspeed: Optional[str] = _opt(None, "DeepSpeed JSON config (configs/zero2.json, zero3.json, ...); unset = "
                                          "plain torch")
    sequence_parallel_size: int = _opt(1, "ranks that share one packed row along the sequence (DeepSpeed Ulysses; "
                                          "data parallel across groups); 1 = off", low=1)
    # run directory, logging, checkpoints
    output_dir: str = _opt("runs/logo", "run directory: config, metrics.jsonl, TensorBoard events, checkpoints",
                           resume="free")
    log_every: int = _opt(1, "log metrics every N steps", low=1, resume="free")
    eval_every: int = _opt(0, "evaluate every N steps (0: before and after training only)", low=0, resume="free")
    save_every: int = _opt(100, "checkpoint every N steps (0: final only)", low=0, resume="free")
    keep_checkpoints: int = _opt(2, "checkpoints kept (oldest deleted)", low=1, resume="free")
    resume: bool = _opt(False, "continue from the newest checkpoint in output_dir (refused if the saved config "
                               "differs in anything but run length, logging, evaluation and checkpointing)",
                        resume="free")
    overwrite: bool = _opt(False, "start a new run in an output_dir that holds another run, deleting it",
                           resume="free")
    stop_after: Optional[int] = _opt(None, "end this invocation after N steps with a checkpoint (time-limited "
                                           "jobs); continue with --resume", low=1, resume="free")
    eval_max_new_tokens: int = _opt(24, "greedy tokens generated for retrieval exact match", low=1, resume="free")
    progress: bool = _opt(True, "show a tqdm progress bar", resume="free")

    @property
    def embedded(self) -> bool:
        return self.model is None

    def validate(self) -> "TrainConfig":
        """Every field's class and range, then the combinations (module doc). Returns self."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.window is not None and self.max_context_tokens is not None and self.window <= self.max_context_tokens:
            raise ConfigError(f"config field 'window' ({self.window}) must exceed max_context_tokens "
                              f"({self.max_context_tokens}): synthesis spreads real tokens over a longer window")
        if self.loss_filter_eps is not None:
            self.loss_filter_eps = _filter_eps_field(self.loss_filter_eps)
        if self.loss_type == "hinge" and self.label_smoothing:
            raise ConfigError("config field 'label_smoothing' must be 0 with loss_type 'hinge'")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise ConfigError("config field 'lora_targets' names no module")
        if self.tiny_hidden_size % self.tiny_heads or (self.tiny_hidden_size // self.tiny_heads) % 2:
            raise ConfigError(f"config fields 'tiny_hidden_size' ({self.tiny_hidden_size}) / 'tiny_heads' "
                              f"({self.tiny_heads}) must give an even head size (RoPE)")
        if (self.warmup_copy_steps or self.warmup_sft_steps) and self.deepspeed:
            raise ConfigError("the warm-up stages (warmup_copy_steps, warmup_sft_steps) build the embedded toy's base "
                              "model in one process: not with --deepspeed")
        if self.sequence_parallel_size > 1 and not self.deepspeed:
            raise ConfigError("config field 'sequence_parallel_size' > 1 runs on DeepSpeed's Ulysses: give --deepspeed "
                              "(e.g. configs/zero3.json) and launch one process per rank")
        if self.resume and self.overwrite:
            raise ConfigError("config fields 'resume' and 'overwrite' exclude each other")
        if not self.output_dir.strip():
            raise ConfigError("config field 'output_dir' is empty")
        return self

    def check_paths(self) -> None:
        """The files and directories the run reads exist (checked before anything is loaded or written)."""
        for name, kind in (("model", "directory"), ("tokenizer", "directory"), ("train_file", "file"),
                           ("eval_file", "file"), ("deepspeed", "file")):
            path = getattr(self, name)
            if path is None:
                continue
            exists = os.path.isdir(path) if kind == "directory" else os.path.isfile(path)
            if not exists:
                hint = " (a local Hugging Face model directory; nothing is downloaded)" if name in ("model",
                                                                                                  "tokenizer") else ""
                raise ConfigError(f"config field '{name}': {path} is not an existing {kind}{hint}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _filter_eps_field(value) -> str:
    """loss_filter_eps: "auto" or a float in (0, 2^-7], kept as its string (the field's type)."""
    from logo_kernels._validation import check_filter_eps

    text = str(value).strip()
    if text == "auto":
        return text
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"config field 'loss_filter_eps' must be 'auto' or a float in (0, 2^-7], got {text!r}") from None
    try:
        check_filter_eps(number)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config field 'loss_filter_eps': {error}") from None
    return text


def _check_field(f: dataclasses.Field, value) -> None:
    meta, name = f.metadata, f.name
    kind = _field_type(f)
    if value is None:
        if not _optional(f):
            raise ConfigError(f"config field {name!r} may not be null")
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config field {name!r}: {value!r} is not one of {list(meta['choices'])}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {name!r} must be true or false, got {value!r}")
        return
    is_tuple = typing.get_origin(kind) is tuple
    values = value if is_tuple else (value,)
    if is_tuple and Ellipsis not in typing.get_args(kind) and len(values) != len(typing.get_args(kind)):
        raise ConfigError(f"config field {name!r} must hold {len(typing.get_args(kind))} numbers, got {value!r}")
    element = typing.get_args(kind)[0] if is_tuple else kind
    for v in values:
        if kind is str:
            if not isinstance(v, str):
                raise ConfigError(f"config field {name!r} must be a string, got {v!r}")
            continue
        number_type = int if element is int else float
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (number_type is int and not isinstance(v, int)):
            raise ConfigError(f"config field {name!r} must be {'an integer' if number_type is int else 'a number'}, "
                              f"got {v!r}")
        if not math.isfinite(v):
            raise ConfigError(f"config field {name!r} must be finite, got {v!r}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (v <= low if meta.get("low_open") else v < low):
            raise ConfigError(f"config field {name!r} must be {'>' if meta.get('low_open') else '>='} {low}, got {v!r}")
        if high is not None and (v >= high if meta.get("high_open") else v > high):
            raise ConfigError(f"config field {name!r} must be {'<' if meta.get('high_open') else '<='} {high}, "
                              f"got {v!r}")


# The embedded default: a tiny model builds its own base model (copy curriculum + SFT on short real contexts),
# then LOGO trains on the same short contexts dressed in a 4x longer position window, and NIAH is measured at
# real contexts up to 5x longer than any seen in training — LOGO's claim at toy scale, in minutes on 2 CPU cores.
EMBEDDED_DEFAULTS: Dict[str, Any] = dict(
    dtype="fp32", finetune="full", gradient_checkpointing=False, window=1024, max_context_tokens=512, chunk_tokens=64,
    max_response_tokens=32, synthetic_train=3000, synthetic_eval=48, synthetic_context_words=20, synthetic_keys=2,
    synthetic_values=2, warmup_copy_steps=2000, warmup_sft_steps=600, warmup_lr=1e-3, learning_rate=5e-4,
    lr_schedule="constant", warmup_steps=20, weight_decay=0.0, adam_betas=(0.9, 0.95), max_steps=500, batch_rows=8,
    grad_accum=1, beta=2.0, gamma=0.5, sft_weight=1.0, save_every=100, eval_niah_lengths=(64, 160, 400),
    eval_niah_samples=16, eval_niah_format="kv", eval_max_new_tokens=16, output_dir="runs/logo-default")


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _optional(f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name])


def _convert(name: str, value: Any) -> Any:
    """A file or CLI value converted to the field's type (error names the field); ranges are checked later."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    f = fields[name]
    kind = _field_type(f)
    try:
        if value is None or (_optional(f) and isinstance(value, str) and value.lower() in ("none", "null", "")):
            if not _optional(f):
                raise ValueError("may not be null")
            return None
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"expected true/false, got {value!r}")
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(f"expected true/false, got {value!r}")
            return value
        if isinstance(value, bool):  # YAML's `max_steps: true` must not become 1
            raise ValueError(f"expected {'an integer' if kind is int else 'a value'}, got {value!r}")
        if typing.get_origin(kind) is tuple:
            items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
            element = typing.get_args(kind)[0]
            return tuple(_number(element, x) for x in items)
        if name == "loss_filter_eps" and isinstance(value, (int, float)):  # a config file's number, kept as text
            return repr(float(value))
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        return _number(kind, value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config field {name!r}: {error}") from None


def _number(kind, value):
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"expected a number, got {value!r}")
    if kind is int:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            number = int(number)
        return int(number)
    return float(value)


def read_config_file(path: str) -> Dict[str, Any]:
    """Key/values of a YAML or JSON config file; unknown keys and syntax errors name the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise InputFileError(f"--config: {path}: no such file") from None
    except UnicodeDecodeError:
        raise InputFileError(f"--config: {path}: not UTF-8 text") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise InputFileError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except Exception as error:  # yaml.YAMLError: its mark names the line
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise InputFileError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: a config file must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(str(k).replace("-", "_") for k in data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown config field(s) {unknown}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logo.train", description=__doc__.split("\n\n")[0],
                                     epilog="--debug: show the traceback of a user error too")
    parser.add_argument("--config", help="YAML or JSON file of options (overridden by the command line)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        help_text = f.metadata["help"]
        if f.name in EMBEDDED_DEFAULTS:
            help_text += f" [embedded default: {EMBEDDED_DEFAULTS[f.name]}]"
        flag = "--" + f.name.replace("_", "-")
        if _field_type(f) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{help_text} (default: {default})")
    return parser


def parse_config(argv: Optional[List[str]] = None) -> Tuple[TrainConfig, List[str]]:
    """(config, names of explicitly set fields) from ``argv`` (module doc for precedence)."""
    args = vars(build_parser().parse_args(argv))
    values: Dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(read_config_file(config_file))
    values.update(args)
    explicit = sorted(values)
    model = _convert("model", values["model"]) if "model" in values else None
    merged = {} if model is not None else dict(EMBEDDED_DEFAULTS)
    merged.update(values)
    converted = {name: _convert(name, value) for name, value in merged.items()}
    return TrainConfig(**converted).validate(), explicit


def save_config(config: TrainConfig, path: str) -> None:
    """Writes the config as JSON atomically (temp file + rename)."""
    write_json_atomically(path, config.to_dict())


def resume_differences(saved: Dict[str, Any], config: TrainConfig) -> List[str]:
    """The fields that differ between a run's saved config and ``config`` and that ``--resume`` may not change
    (``resume="fixed"``), as ``field: saved -> new`` lines. Fields the saved config lacks (an older version of
    the package) count as their defaults."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["resume"] == "free":
            continue
        new = getattr(config, f.name)
        old = saved.get(f.name, f.default)
        if isinstance(new, tuple):
            old = tuple(old) if isinstance(old, list) else old
        if old != new:
            lines.append(f"{f.name}: {old!r} -> {new!r}")
    return lines

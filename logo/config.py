"""The typed training configuration of ``python -m logo.train``: defaults, YAML/JSON file, CLI overrides.

Defaults follow the paper's recipe for real models (LOGO_NOTES: M=2, beta=10, gamma=3, lambda=0.1, LoRA
r32/alpha16/dropout 0 on q,k,v,o + embeddings, bf16, gradient checkpointing, a 64K window of 16x512
chunks). Without ``--model`` the run is the embedded default (a tiny Llama from config on the synthetic
retrieval task), and :data:`EMBEDDED_DEFAULTS` replace the options the user did not set.
Precedence: dataclass default < embedded default (no model) < ``--config`` file < command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _opt(default, help: str, choices: Sequence = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model
    model: Optional[str] = _opt(None, "local Hugging Face model directory (AutoModelForCausalLM); unset = the "
                                      "embedded tiny Llama")
    tokenizer: Optional[str] = _opt(None, "tokenizer directory (default: --model; embedded: trained offline)")
    dtype: str = _opt("bf16", "parameter/compute dtype", ("bf16", "fp16", "fp32"))
    attn_implementation: str = _opt("sdpa", "attention of non-packed passes (eval, generation); packed rows "
                                            "always use shared-prefix attention", ("sdpa", "eager",
                                                                                    "flash_attention_2", "flex_attention"))
    rope_theta: Optional[float] = _opt(None, "override the model's RoPE base (paper: 2e8 for Llama-3-8B-8K)")
    max_position_embeddings: Optional[int] = _opt(None, "override the model's max_position_embeddings")
    gradient_checkpointing: bool = _opt(True, "recompute decoder layers in the backward")
    finetune: str = _opt("lora", "LoRA adapters (peft) or full fine-tuning", ("lora", "full"))
    lora_r: int = _opt(32, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout (the recipe disables dropout)")
    lora_targets: str = _opt("q_proj,k_proj,v_proj,o_proj,embed_tokens",
                             "comma-separated module names that get LoRA adapters")
    # embedded model shape (only without --model)
    tiny_hidden_size: int = _opt(128, "embedded model: hidden size")
    tiny_layers: int = _opt(2, "embedded model: decoder layers")
    tiny_heads: int = _opt(4, "embedded model: attention heads (2 key/value heads)")
    # data
    train_file: Optional[str] = _opt(None, "preference JSONL (logo.data.records); unset = synthetic task")
    eval_file: Optional[str] = _opt(None, "held-out preference JSONL; unset = synthetic held-out split "
                                          "(with a train file: no evaluation)")
    synthetic_train: int = _opt(512, "synthetic task: training records")
    synthetic_eval: int = _opt(64, "synthetic task: held-out records")
    synthetic_context_words: int = _opt(1000, "synthetic task: words of filler text per context")
    use_chat_template: bool = _opt(True, "use the tokenizer's chat template (else the plain template)")
    max_context_tokens: Optional[int] = _opt(16 * 512, "cut longer contexts in the middle (paper: 16 x 512)")
    max_response_tokens: Optional[int] = _opt(512, "cut longer responses")
    window: Optional[int] = _opt(65536, "positional indices synthesis: target window K (unset: no synthesis)")
    chunk_tokens: int = _opt(512, "positional indices synthesis: chunk size")
    position_strategy: str = _opt("mixed", "positional indices synthesis strategy",
                                  ("continuous", "sparse", "slots", "mixed"))
    continuous_ratio: float = _opt(0.9, "share of 'continuous' samples in the 'mixed' strategy")
    # objective
    num_negatives: int = _opt(2, "M, rejected responses per example")
    beta: float = _opt(10.0, "reward scale beta")
    gamma: float = _opt(3.0, "target reward margin gamma")
    sft_weight: float = _opt(0.1, "lambda, weight of the SFT (chosen NLL) term")
    loss_type: str = _opt("sigmoid", "LOGO loss form: -log sigmoid(z) (paper) or hinge relu(1 - z)",
                          ("sigmoid", "hinge"))
    label_smoothing: float = _opt(0.0, "label smoothing of the sigmoid loss")
    loss_backend: str = _opt("auto", "fused op backend", ("auto", "torch", "cpp", "triton"))
    # optimisation
    learning_rate: float = _opt(5e-7, "peak learning rate (the authors' release: 5e-7; their experiments span "
                                      "1e-6 .. 1e-4)")
    lr_schedule: str = _opt("cosine", "after warmup", ("cosine", "constant"))
    warmup_steps: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: Tuple[float, float] = _opt((0.9, 0.95), "AdamW betas")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0: off)")
    max_steps: int = _opt(1000, "optimizer steps")
    batch_rows: int = _opt(1, "packed rows (examples) per device per micro-batch")
    grad_accum: int = _opt(8, "micro-batches per optimizer step")
    seed: int = _opt(42, "seed of model init, data order, positions")
    # distributed
    deepspeed: Optional[str] = _opt(None, "DeepSpeed JSON config (configs/zero2.json, zero3.json, ...); unset = "
                                          "plain torch")
    # run directory, logging, checkpoints
    output_dir: str = _opt("runs/logo", "run directory: config, metrics.jsonl, TensorBoard events, checkpoints")
    log_every: int = _opt(1, "log metrics every N steps")
    eval_every: int = _opt(0, "evaluate every N steps (0: before and after training only)")
    save_every: int = _opt(100, "checkpoint every N steps (0: final only)")
    keep_checkpoints: int = _opt(2, "checkpoints kept (oldest deleted)")
    resume: bool = _opt(False, "continue from the newest checkpoint in output_dir")
    stop_after: Optional[int] = _opt(None, "end this invocation after N steps with a checkpoint (time-limited "
                                           "jobs); continue with --resume")
    eval_max_new_tokens: int = _opt(24, "greedy tokens generated for retrieval exact match")
    progress: bool = _opt(True, "show a tqdm progress bar")

    @property
    def embedded(self) -> bool:
        return self.model is None

    def validate(self) -> "TrainConfig":
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"config field {f.name!r}: {getattr(self, f.name)!r} is not one of {list(choices)}")
        positive = ("num_negatives", "max_steps", "batch_rows", "grad_accum", "chunk_tokens", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"config field 'learning_rate' must be > 0, got {self.learning_rate}")
        if self.window is not None and self.max_context_tokens is not None and self.window <= self.max_context_tokens:
            raise ValueError(f"config field 'window' ({self.window}) must exceed max_context_tokens "
                             f"({self.max_context_tokens}): synthesis spreads real tokens over a longer window")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The embedded default: a tiny model trained from scratch on the synthetic task in minutes on 2 CPU cores.
EMBEDDED_DEFAULTS: Dict[str, Any] = dict(
    dtype="fp32", finetune="full", gradient_checkpointing=False, window=8192, max_context_tokens=2048,
    max_response_tokens=64, learning_rate=2e-3, warmup_steps=10, max_steps=150, batch_rows=4, grad_accum=1,
    beta=2.0, gamma=0.5, sft_weight=1.0, save_every=40, output_dir="runs/logo-default")


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _convert(name: str, value: Any) -> Any:
    """A file or CLI value converted to the field's type (error names the field)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    kind = _field_type(f)
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = type(None) in typing.get_args(hint)
    try:
        if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
            if not optional:
                raise ValueError("may not be null")
            return None
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"expected true/false, got {value!r}")
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(x) for x in items)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value}")
        return kind(float(value)) if kind is int and isinstance(value, str) and "e" in value.lower() else kind(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config field {name!r}: {error}") from None


def read_config_file(path: str) -> Dict[str, Any]:
    """Key/values of a YAML or JSON config file; unknown keys are an error naming them."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {unknown}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logo.train", description=__doc__.split("\n\n")[0])
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
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2)
    os.replace(tmp, path)


def load_saved_config(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)

"""The model an evaluation runs: a Hugging Face model directory, or a ``logo.train`` run directory.

A run directory (``config.json`` written by ``logo.train`` + ``final/``) is loaded the way training saved it:
``final/`` holds the whole model (full fine-tuning: its config already carries the run's RoPE settings) or a
LoRA adapter, which is applied to the run's base model (``config.json``'s ``model``) loaded with the run's
``rope_theta`` / ``max_position_embeddings`` overrides, then merged. The tokenizer is the run's. Explicit
``rope_theta`` / ``max_position_embeddings`` arguments override both.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was loaded, for the results


def _run_config(path: str) -> Optional[dict]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    return config if "num_negatives" in config and "model_type" not in config else None


def _override(model_config, rope_theta, max_position_embeddings) -> None:
    if rope_theta is not None:
        parameters = getattr(model_config, "rope_parameters", None)
        if isinstance(parameters, dict):
            parameters["rope_theta"] = float(rope_theta)
        else:
            model_config.rope_theta = float(rope_theta)
    if max_position_embeddings is not None:
        model_config.max_position_embeddings = int(max_position_embeddings)


def _from_pretrained(path: str, dtype, attn_implementation: str, rope_theta, max_position_embeddings):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    _override(model_config, rope_theta, max_position_embeddings)
    return AutoModelForCausalLM.from_pretrained(path, config=model_config, dtype=DTYPES[dtype],
                                                attn_implementation=attn_implementation, local_files_only=True)


def load_for_eval(path: str, *, dtype: str = "auto", attn_implementation: str = "sdpa", device: Optional[str] = None,
                  rope_theta: Optional[float] = None, max_position_embeddings: Optional[int] = None) -> LoadedModel:
    """The model at ``path`` (module doc), in eval mode on ``device`` (default: CUDA when available)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ConfigError(f"--model: {path} is not a directory (a Hugging Face model directory or a logo.train run "
                          "directory; nothing is downloaded)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    run = _run_config(path)
    if run is None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"--model: {path} holds no config.json (neither a model nor a logo.train run)")
        model = _from_pretrained(path, dtype, attn_implementation, rope_theta, max_position_embeddings)
        tokenizer, source = AutoTokenizer.from_pretrained(path, local_files_only=True), path
    else:
        final = os.path.join(path, "final")
        if not os.path.isdir(final):
            raise ConfigError(f"--model: the run in {path} has no final/ model (not finished: continue it with "
                              f"python -m logo.train --resume --output-dir {path})")
        tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
        if os.path.isfile(os.path.join(final, "adapter_config.json")):
            from peft import PeftModel

            base = run.get("model")
            if not base or not os.path.isdir(base):
                raise ConfigError(f"--model: the run's LoRA adapter needs its base model {base!r}, which is not a "
                                  "directory here")
            model = _from_pretrained(base, dtype, attn_implementation,
                                     rope_theta if rope_theta is not None else run.get("rope_theta"),
                                     max_position_embeddings if max_position_embeddings is not None
                                     else run.get("max_position_embeddings"))
            model = PeftModel.from_pretrained(model, final).merge_and_unload()
            source = f"{path} (LoRA on {base})"
        else:
            model = _from_pretrained(final, dtype, attn_implementation, rope_theta, max_position_embeddings)
            source = f"{path} (final/)"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel(model.to(device).eval(), tokenizer, source)

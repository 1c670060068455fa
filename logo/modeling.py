"""Model and tokenizer loading for LOGO training: local HF causal LMs or the embedded tiny Llama.

``load_tokenizer`` / ``load_model`` read a local directory (no network: ``local_files_only``), apply the
RoPE / max-position overrides, switch dropout off, enable gradient checkpointing, add LoRA adapters with
peft (or leave every weight trainable), and switch attention to the shared-prefix kernel (which is plain
SDPA for unpacked calls, so evaluation and generation use the same model).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(config: TrainConfig, save_dir: Optional[str] = None):
    """The run's tokenizer: ``config.tokenizer`` or ``config.model``; embedded runs train the offline one
    (saved under ``save_dir``, and reloaded from there on resume so ids never change)."""
    from transformers import AutoTokenizer

    source = config.tokenizer or config.model
    if source is None and save_dir is not None and os.path.isfile(os.path.join(save_dir, "tokenizer.json")):
        source = save_dir
    if source is None:
        from .data.tokenizer import default_tokenizer

        return default_tokenizer(save_dir=save_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if save_dir is not None and source != save_dir:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def _set_rope_theta(model_config, theta: float) -> None:
    parameters = getattr(model_config, "rope_parameters", None)
    if isinstance(parameters, dict):
        parameters["rope_theta"] = float(theta)
    else:
        model_config.rope_theta = float(theta)


def _disable_dropout(model_config) -> None:
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model_config, name, None), float):
            setattr(model_config, name, 0.0)


def embedded_model_config(config: TrainConfig, vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=config.tiny_hidden_size,
                       intermediate_size=4 * config.tiny_hidden_size, num_hidden_layers=config.tiny_layers,
                       num_attention_heads=config.tiny_heads, num_key_value_heads=max(1, config.tiny_heads // 2),
                       max_position_embeddings=config.max_position_embeddings or config.window or 8192,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta or 10000.0},
                       tie_word_embeddings=False, pad_token_id=pad_token_id)


def load_model(config: TrainConfig, tokenizer):
    """The causal LM to train (module doc). Parameters in ``config.dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from .attention import enable_shared_prefix_attention

    dtype = DTYPES[config.dtype]
    if config.embedded:
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(embedded_model_config(config, len(tokenizer), tokenizer.pad_token_id)).to(dtype)
        if config.finetune == "full":
            # zero-initialised output layer: the untrained model predicts the uniform distribution, so every
            # response starts with the same reward and held-out accuracy starts exactly at chance (50%)
            # instead of at whatever preference a random head has for the chosen responses' fixed tokens.
            # (Not with LoRA: a frozen zero head would pass no gradient to the adapters.)
            torch.nn.init.zeros_(model.lm_head.weight)
    else:
        model_config = AutoConfig.from_pretrained(config.model, local_files_only=True)
        if config.rope_theta is not None:
            _set_rope_theta(model_config, config.rope_theta)
        if config.max_position_embeddings is not None:
            model_config.max_position_embeddings = config.max_position_embeddings
        _disable_dropout(model_config)
        model = AutoModelForCausalLM.from_pretrained(config.model, config=model_config, dtype=dtype,
                                                     attn_implementation=config.attn_implementation,
                                                     local_files_only=True)
    _disable_dropout(model.config)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.finetune == "lora":
        model = add_lora(model, config)
    enable_shared_prefix_attention(model)
    return model


def add_lora(model, config: TrainConfig):
    """LoRA adapters (peft) on ``config.lora_targets``; every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"config field 'lora_targets': no module named {missing} in {type(model).__name__}")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def trainable_parameter_list(model):
    """The parameters that train (LoRA adapters, or everything in full fine-tuning)."""
    return [p for p in model.parameters() if p.requires_grad]


def export_final(module, tokenizer, path: str, world) -> None:
    """The trained model (or LoRA adapter) and tokenizer in Hugging Face format, written atomically (``path.tmp``
    then renamed); ZeRO-3 partitions are gathered first. A failed write removes ``path.tmp``, leaves an earlier
    ``path`` as it was, and raises :class:`~logo.errors.StorageError` on every rank."""
    import shutil

    from logo_kernels._zero3 import gathered

    from .errors import StorageError, as_storage_error
    from .files import remove_quietly

    params = [p for p in module.parameters() if p.requires_grad] if hasattr(module, "peft_config") else \
        list(module.parameters())
    tmp = f"{path}.tmp"
    failure = None
    with gathered(*params):
        if world.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
                module.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
            except Exception as error:
                failure = as_storage_error(error, tmp)
                if failure is None:
                    raise
                remove_quietly(tmp)
    if not world.all_true(failure is None):
        raise failure or StorageError(tmp, "the main rank could not write the exported model")

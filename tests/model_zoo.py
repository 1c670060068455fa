"""Tiny models of every family the shared-prefix attention claims, built from each family's own config class.

Each entry sets what makes the family's attention more than causal SDPA — a sliding window shorter than the
test prefixes, softcap small enough to bend the scores, random attention sinks — and GQA (4 query heads over 2
key/value heads) wherever the family has it.
"""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 97
WINDOW = 5  # shorter than every test prefix

_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, overrides, what the family's attention does beyond causal SDPA)
ZOO = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}, "full attention"),
    "mistral-sliding": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=WINDOW), "sliding window"),
    "qwen2-sliding": (T.Qwen2Config, T.Qwen2ForCausalLM,
                      dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, num_hidden_layers=3),
                      "sliding window on layers >= max_window_layers"),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=8), "full attention, q/k norms"),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
               dict(head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
                    query_pre_attn_scalar=8), "attention softcap + alternating sliding layers"),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(head_dim=8, sliding_window=WINDOW, num_hidden_layers=3, query_pre_attn_scalar=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
               "sliding / global layers"),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(rope_parameters=None), "full attention, fused qkv"),
    "gpt-oss": (T.GptOssConfig, T.GptOssForCausalLM,
                dict(head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
                "attention sinks + alternating sliding layers, MoE"),
    "qwen3-moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       norm_topk_prob=True), "MoE (router + experts)"),
}


def build(name: str, seed: int = 0, **overrides):
    """The tiny model of family ``name`` (fp32, eval mode, dropout off); GPT-OSS sinks drawn at random."""
    config_class, model_class, extra, _ = ZOO[name]
    values = {**_BASE, **extra, **overrides}
    if values.get("rope_parameters", 0) is None:
        values.pop("rope_parameters")
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for module_name, parameter in model.named_parameters():
            if module_name.endswith("sinks"):
                parameter.normal_(0.0, 1.0)
    return model

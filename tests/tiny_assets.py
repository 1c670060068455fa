"""Saved tiny assets for tests that run ``logo.train`` on a model directory: a 1-layer Llama with the offline
tokenizer, and a small preference file of the synthetic task."""
import os

import transformers


def save_tiny_llama_and_preferences(root, *, kv_heads: int = 1):
    """Writes ``root/model`` (Llama, hidden 32, 2 heads, ``kv_heads`` key/value heads, + tokenizer) and
    ``root/prefs.jsonl`` (4 records); returns their paths as strings."""
    from logo.data.records import write_preference_file
    from logo.data.synthetic import make_kv_records
    from logo.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=kv_heads,
                                      max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model_dir, prefs = os.path.join(str(root), "model"), os.path.join(str(root), "prefs.jsonl")
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_preference_file(make_kv_records(4, context_words=150), prefs)
    return model_dir, prefs

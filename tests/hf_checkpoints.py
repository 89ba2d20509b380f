"""Random HF checkpoints built with transformers: the reference nobody here wrote."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512

# name -> (transformers config class name, config overrides)
SHAPES: dict[str, tuple[str, dict]] = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                        rope_theta=500000.0,
                                        rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=32))),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                      sliding_window=None)),
}

_MODELS = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
           "MistralConfig": "MistralForCausalLM"}


def build_checkpoint(name: str, out: Path, seed: int = 0):
    """Save a random checkpoint of shape ``name`` under ``out``; returns the HF model (float32)."""
    import transformers

    cfg_cls, overrides = SHAPES[name]
    kwargs = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, vocab_size=VOCAB,
                  max_position_embeddings=256, initializer_range=0.1, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, _MODELS[cfg_cls])(config).eval()
    if getattr(config, "attention_bias", False) or cfg_cls == "Qwen2Config":
        # Default init zeroes biases; make them count.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()

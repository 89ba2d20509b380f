"""Built-in models, generated deterministically as HF-format checkpoints on first use.

No download, ever: weights come from a seeded torch generator and the
byte-level BPE tokenizer is trained with `tokenizers` on a seeded synthetic
corpus. The checkpoint lands in ``$ADRENALINE_CACHE`` (default
~/.cache/adrenaline) under a versioned name, written to a temporary directory
and renamed, so concurrent first uses are safe.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

BUILTIN_VERSION = 1
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad

BUILTINS: dict[str, dict] = {
    # A few million parameters: the default demo and the tests.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                 max_position_embeddings=2048, torch_dtype="float32"),
    # Benchmarks: about 156M parameters.
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                  max_position_embeddings=4096, torch_dtype="bfloat16"),
}


def cache_root() -> Path:
    return Path(os.environ.get("ADRENALINE_CACHE", Path.home() / ".cache" / "adrenaline"))


def builtin_path(name: str) -> Path:
    """The checkpoint directory of built-in ``name``, generated if absent."""
    if name not in BUILTINS:
        raise KeyError(name)
    target = cache_root() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _write_checkpoint(name, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_checkpoint(name: str, out: Path) -> None:
    spec = BUILTINS[name]
    write_random_checkpoint(out, spec)
    _write_tokenizer(out, spec["vocab_size"], spec["max_position_embeddings"])


def write_random_checkpoint(out: Path, spec: dict) -> Path:
    """An HF-format Llama directory (config.json + weights, no tokenizer) with seeded random weights.

    ``spec`` holds the config fields of BUILTINS' entries; prompts to such a model
    are token ids.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        **spec,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    dtype = getattr(torch, spec["torch_dtype"])
    save_file(_random_weights(spec, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _random_weights(spec: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    h, m, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    d = h // spec["num_attention_heads"]
    kv = spec["num_key_value_heads"] * d

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    w = {"model.embed_tokens.weight": normal(v, h)}
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(h, h)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, h)
        w[p + "mlp.gate_proj.weight"] = normal(m, h)
        w[p + "mlp.up_proj.weight"] = normal(m, h)
        w[p + "mlp.down_proj.weight"] = normal(h, m)
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    w["model.norm.weight"] = torch.ones(h, dtype=dtype)
    w["lm_head.weight"] = normal(v, h)
    return w


def _synthetic_corpus(seed: int = 7, num_words: int = 400_000) -> list[str]:
    """Pseudo-words from syllables: enough distinct pairs to learn thousands of merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
              "w", "z", "br", "ch", "cl", "dr", "gr", "pl", "qu", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st"]
    lexicon = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.randint(1, 4))) for _ in range(20_000)]
    lines, line = [], []
    for _ in range(num_words):
        line.append(rng.choice(lexicon))
        if len(line) == 12:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return lines


def _write_tokenizer(out: Path, vocab_size: int, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_synthetic_corpus(), trainer=trainer)
    # Every model id must decode: pad the vocabulary up to the model's size.
    short = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if short > 0:
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(short)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": max_len}, indent=2))


"""Build a tokenizer.json + tokenizer_config.json from a GGUF file's tokenizer metadata.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, the Llama 3 / Qwen2 /
SmolLM family) through the `tokenizers` library: the file's tokens (already
spelled in the byte alphabet) and merges, its CONTROL tokens as special
tokens, its USER_DEFINED ones as added tokens, and the pre-tokenizer that
``tokenizer.ggml.pre`` names, as llama.cpp splits text for it. The chat
template, bos/eos/pad/unk and add_bos/add_eos come from the metadata too.
"""

from __future__ import annotations

import json
from pathlib import Path

from adrenaline.config import ConfigError
from adrenaline.model.gguf_reader import GGUFFile

# llama.cpp token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of llama.cpp's pre-tokenizer types (the GPT-2 one is ByteLevel's own).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how text is split before BPE:
#   "gpt2": ByteLevel's GPT-2 regex; "digits": every digit alone, then the GPT-2 regex
#   (the original tokenizer.json of these models: Digits(individual) + ByteLevel);
#   otherwise a split regex, then ByteLevel without its own regex.
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits", "minerva": "digits",
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3, "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


def write_tokenizer(gguf: GGUFFile, out: Path) -> None:
    """Write ``out``/tokenizer.json and tokenizer_config.json for the file's tokenizer."""
    kind = gguf.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"model: {gguf.path}: GGUF tokenizer {kind!r} is not supported "
                          "(only byte-level BPE, 'gpt2')")
    tokens: list[str] = gguf.require("tokenizer.ggml.tokens")
    types: list[int] = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = _byte_level_bpe(tokens, gguf.get("tokenizer.ggml.merges") or [],
                          gguf.get("tokenizer.ggml.pre", "default"), gguf.path)
    from tokenizers import AddedToken, processors

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = gguf.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [bos] if add_bos else []
        last = [eos] if add_eos else []
        ids = {t: tokens.index(t) for t in first + last}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last),
            pair=" ".join(first + ["$A"] + last + first + ["$B"] + last),
            special_tokens=list(ids.items()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": token("padding"),
        "unk_token": token("unknown"), "add_bos_token": add_bos, "add_eos_token": add_eos,
        "chat_template": gguf.get("tokenizer.chat_template"),
    }, indent=2))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise ConfigError(f"model: {path}: GGUF pre-tokenizer {pre!r} is not supported "
                          f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok

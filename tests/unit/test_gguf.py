"""GGUF reading: every supported type dequantizes as the format defines it, other types are a
clear error, and a GGUF written the way llama.cpp writes one loads into an engine whose greedy
tokens equal transformers' on the source checkpoint (q/k un-permuted, biases, tied head)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from adrenaline import ConfigError, LLM, SamplingParams
from tests.hf_checkpoints import SHAPES, VOCAB, build_checkpoint, hf_greedy

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)


def _f16(n: int, scale: float) -> np.ndarray:
    return (RNG.uniform(-1, 1, n) * scale).astype(np.float16)


# Each builder returns (raw bytes [rows, row_bytes], the values the format defines [rows, cols]),
# decoded here element by element from llama.cpp's block layouts.

def _q8_0(rows: int, cols: int):
    nb = rows * cols // 32
    d, q = _f16(nb, 0.05), RNG.integers(-128, 128, (nb, 32), dtype=np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
    vals = d.astype(np.float32)[:, None] * q.astype(np.float32)
    return raw.reshape(rows, -1), vals.reshape(rows, cols)


def _q4(rows: int, cols: int, with_min: bool):
    nb = rows * cols // 32
    d, m = _f16(nb, 0.05), _f16(nb, 0.5)
    qs = RNG.integers(0, 256, (nb, 16), dtype=np.uint8)
    nibbles = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # [nb, 32]
    head = [d.view(np.uint8).reshape(nb, 2)] + ([m.view(np.uint8).reshape(nb, 2)] if with_min else [])
    raw = np.concatenate(head + [qs], axis=1)
    if with_min:  # Q4_1: d * q + m
        vals = d.astype(np.float32)[:, None] * nibbles + m.astype(np.float32)[:, None]
    else:  # Q4_0: d * (q - 8)
        vals = d.astype(np.float32)[:, None] * (nibbles - 8)
    return raw.reshape(rows, -1), vals.reshape(rows, cols)


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _q4_k(rows: int, cols: int):
    nb = rows * cols // 256
    d, dmin = _f16(nb, 0.01), _f16(nb, 0.01)
    scales = RNG.integers(0, 256, (nb, 12), dtype=np.uint8)
    qs = RNG.integers(0, 256, (nb, 128), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                          scales, qs], axis=1)
    vals = np.zeros((nb, 256), np.float32)
    for b in range(nb):
        for pair in range(4):  # 64 values: 32 low nibbles then 32 high nibbles of 32 bytes
            q = qs[b, 32 * pair:32 * pair + 32].astype(np.int32)
            for half, nib in ((0, q & 0xF), (1, q >> 4)):
                sc, mn = _scale_min_k4(2 * pair + half, scales[b].astype(np.int32))
                dd = np.float32(d[b]) * np.float32(sc)
                mm = np.float32(dmin[b]) * np.float32(mn)
                vals[b, 64 * pair + 32 * half:64 * pair + 32 * half + 32] = dd * nib - mm
    return raw.reshape(rows, -1), vals.reshape(rows, cols)


def _q6_k(rows: int, cols: int):
    nb = rows * cols // 256
    ql = RNG.integers(0, 256, (nb, 128), dtype=np.uint8)
    qh = RNG.integers(0, 256, (nb, 64), dtype=np.uint8)
    sc = RNG.integers(-128, 128, (nb, 16), dtype=np.int8)
    d = _f16(nb, 0.001)
    raw = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    vals = np.zeros((nb, 256), np.float32)
    for b in range(nb):
        for n in range(2):  # two halves of 128 values
            L, H, S = ql[b, 64 * n:].astype(np.int32), qh[b, 32 * n:].astype(np.int32), sc[b, 8 * n:]
            for l in range(32):
                i = l // 16
                q = [((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32,
                     ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32,
                     ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32,
                     ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32]
                for k in range(4):
                    vals[b, 128 * n + 32 * k + l] = np.float32(d[b]) * np.float32(S[i + 2 * k]) * q[k]
    return raw.reshape(rows, -1), vals.reshape(rows, cols)


def _float(kind: str):
    def build(rows: int, cols: int):
        vals = RNG.standard_normal((rows, cols)).astype(np.float32)
        if kind == "F16":
            vals = vals.astype(np.float16).astype(np.float32)
            return vals.astype(np.float16).view(np.uint8), vals
        if kind == "BF16":
            bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
            return bits.view(np.uint8), (bits.astype(np.uint32) << 16).view(np.float32)
        return vals.view(np.uint8), vals
    return build


BUILDERS = {
    "F32": _float("F32"), "F16": _float("F16"), "BF16": _float("BF16"),
    "Q8_0": _q8_0, "Q4_0": lambda r, c: _q4(r, c, False), "Q4_1": lambda r, c: _q4(r, c, True),
    "Q4_K": _q4_k, "Q6_K": _q6_k,
}


def _write(path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for name, (raw, kind) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_dequantize_matches_block_layout(tmp_path, kind):
    from adrenaline.model.gguf_reader import dequantize

    raw, expected = BUILDERS[kind](3, 512)
    _write(tmp_path / "t.gguf", {"w": (raw, T[kind])})
    (tensor,) = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors
    got = dequantize(tensor)
    assert got.dtype == np.float32 and got.shape == (3, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_unsupported_type_names_type_and_tensor(tmp_path):
    from adrenaline.model.gguf_reader import dequantize

    raw = RNG.integers(0, 256, (2, 176), dtype=np.uint8)  # two Q5_K blocks of 256 values
    _write(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (raw, T.Q5_K)})
    (tensor,) = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors
    with pytest.raises(ConfigError, match=r"'blk\.0\.ffn_up\.weight'.*Q5_K"):
        dequantize(tensor)


def test_not_a_gguf_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match="GGUF"):
        LLM(str(bad))


# ---- a whole model, written as llama.cpp's converter writes it ---------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def _write_model_gguf(model, path, arch: str) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters")
                         and cfg.rope_parameters else cfg.rope_theta)
    # A byte-level vocabulary: the 256 byte symbols, then plain filler tokens up to VOCAB.
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [f"tok{i}" for i in range(VOCAB - len(alphabet) - 1)] + ["<|end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(VOCAB - 1)
    permuted = arch == "llama"
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float().numpy()
        if permuted and "q_proj" in name:
            t = _permute(t, cfg.num_attention_heads)
        elif permuted and "k_proj" in name:
            t = _permute(t, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            out = f"blk.{idx}.{_NAMES[module]}.{kind}"
        w.add_tensor(out, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("shape, arch", [("llama_gqa", "llama"), ("llama_tied", "llama"),
                                         ("qwen2_bias", "qwen2")])
def test_gguf_model_greedy_matches_source_checkpoint(tmp_path, monkeypatch, shape, arch):
    monkeypatch.setenv("ADRENALINE_CACHE", str(tmp_path / "cache"))
    model = build_checkpoint(shape, tmp_path / "hf")
    _write_model_gguf(model, tmp_path / f"{shape}.gguf", arch)
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB - 1) for _ in range(n)] for n in (3, 11, 25, 40)]
    llm = LLM(str(tmp_path / f"{shape}.gguf"), dtype="float32")
    assert llm.engine.model_config.architecture == SHAPES[shape][0].replace("Config", "ForCausalLM")
    assert llm.engine.model_config.tie_word_embeddings == (shape == "llama_tied")
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 10) for p in prompts]
    # The conversion is cached: a second engine reuses the directory.
    assert LLM(str(tmp_path / f"{shape}.gguf")).engine.model_dir == llm.engine.model_dir

"""SmolLM2-135M-Instruct from its GGUF: ours equals transformers loading the same file.

Greedy tokens through the offline LLM (float32), tokenizer ids, decoded text and
the chat template's rendering. Served parity (with offloading) is in
tests/integration/test_smollm2_served.py.
"""

from __future__ import annotations

import random

import pytest

from adrenaline import LLM, SamplingParams
from adrenaline.model.tokenizer import Tokenizer
from tests.smollm2 import MAX_NEW, MODEL, load_hf_tokenizer


def test_offline_greedy_matches_transformers(smollm2_reference):
    llm = LLM(MODEL, dtype="float32")
    outs = llm.generate([p for p, _ in smollm2_reference],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
    got = [o.token_ids for o in outs]
    expected = [e for _, e in smollm2_reference]
    assert len(got) >= 8 and all(len(g) == MAX_NEW for g in got)
    assert got == expected
    # Trained weights: the answer is right, not just equal.
    assert "Paris" in llm.tokenizer.decode(got[0])


def _strings() -> list[str]:
    fixed = [
        "", " ", "  ", "\n", "\t\t", "Hello world", "Hello, my name is", " leading space",
        "trailing spaces   ", "multiple   internal    spaces", "tabs\tand\nnewlines\r\nmixed",
        "\n\n\nthree newlines", "I'm sure they'll say it's fine, don't you think? We've seen it.",
        "Café naïve résumé façade Ångström", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ",
        "한국어 텍스트입니다", "Россия и Україна", "مرحبا بالعالم", "emoji 😀👍🏽🇫🇷 and ZWJ 👩‍💻",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += 1; }",
        "<html><body class=\"x\">&amp;</body></html>", "SELECT * FROM t WHERE id = 42;",
        "x = {'a': [1, 2, 3], \"b\": None}", "https://example.com/path?q=1&r=two#frag",
        "12345", "3.14159", "1,000,000", "2024-01-31T12:00:00Z", "a1b2c3", "phone: +1 (555) 010-9999",
        "v1.2.3-rc.4", "0x1F 0b1010 1e-9", "½ ² ① ٣ Ⅻ", "  42  ", "a  1", "x\n\n7",
        "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "text<|im_end|>more",
        "<repo_name>adrenaline<file_sep>main.py", "<|im_start|><|im_end|><|im_start|>",
        "<|im_start", "im_end|>", "< |im_start| >",
    ]
    rng = random.Random(0)
    alphabet = (list("abcdefXYZ ,.;:'\"!?()[]{}<>|_-+=*/\\#@$%^&~`\n\t0123456789")
                + ["  ", "   ", "\n\n", " \n ", "é", "ß", "中", "文", "😀", "ю", "٣", "²",
                   "<|im_end|>", "<|im_start|>", "the", " and", "ing", "def ", "return"])
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    return fixed + rand


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir, smollm2_gguf):
    return Tokenizer(smollm2_dir), load_hf_tokenizer(smollm2_gguf)


def _has_numeric(s: str) -> bool:
    return any(c.isnumeric() for c in s)


def test_tokenizer_ids_match_transformers(tokenizers):
    """Ids equal transformers' GGUF tokenizer; decoding round-trips.

    One known difference: transformers' GGUF converter has no entry for
    tokenizer.ggml.pre = "smollm" and splits text with the plain GPT-2 regex,
    while llama.cpp (and the model's own tokenizer.json) first splits off every
    digit alone. We follow llama.cpp, so on text with numeric characters the
    reference is transformers' tokenizer with that one pre-tokenizer put back.
    """
    from tokenizers import pre_tokenizers

    ours, hf = tokenizers
    strings = _strings()
    assert len(strings) >= 300
    plain = [s for s in strings if not _has_numeric(s)]
    numeric = [s for s in strings if _has_numeric(s)]
    assert len(plain) > 50 and len(numeric) > 50
    for s in plain:
        assert ours.encode(s) == hf(s).input_ids, s
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for s in numeric:
        assert ours.encode(s) == hf(s).input_ids, s
    for s in strings:
        ids = ours.encode(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), s
        assert ours.decode(ids, skip_special_tokens=False) == s, s


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another one?"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Hello\n  world"},
     {"role": "assistant", "content": "Bonjour le monde"},
     {"role": "user", "content": "Merci 😀"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tokenizers, add_generation_prompt):
    ours, hf = tokenizers
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected

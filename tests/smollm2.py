"""SmolLM2-135M-Instruct, the real model, and its reference: transformers loading the same GGUF.

The reference side never goes through our converter: transformers reads the
.gguf itself (``from_pretrained(dir, gguf_file=...)``) and runs in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
MAX_NEW = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three colors of the rainbow.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a short tip for staying focused while studying.",
    "Translate 'good morning' into Spanish and German.",
]


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """Our tokenizer's ids of the chat prompt for one user question (template included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return tokenizer.encode(text, add_special_tokens=False)


def load_hf_model(gguf: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: ours runs with ignore_eos
    return model


def load_hf_tokenizer(gguf: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()

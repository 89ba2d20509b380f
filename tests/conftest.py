"""Session fixtures shared by unit and integration tests: the real model and its reference."""

from __future__ import annotations

import pytest

from tests.smollm2 import MODEL, QUESTIONS, chat_prompt_ids, hf_greedy, load_hf_model


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted HF-format directory (the .gguf is fetched once per cache, then reused)."""
    from adrenaline.model.resolve import resolve_model_dir

    return resolve_model_dir(MODEL)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir):
    from adrenaline.model.packaged import packaged_gguf

    return packaged_gguf(MODEL)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir, smollm2_gguf):
    """[(prompt ids, transformers' greedy tokens)] for the chat prompts of QUESTIONS."""
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    model = load_hf_model(smollm2_gguf)
    prompts = [chat_prompt_ids(tok, q) for q in QUESTIONS]
    return [(p, hf_greedy(model, p)) for p in prompts]

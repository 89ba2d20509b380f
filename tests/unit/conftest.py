"""Fixtures the OpenAI-layer unit tests share: the "tiny" model's tokenizer and facts."""

from __future__ import annotations

import pytest

from adrenaline.model.resolve import resolve_model_dir
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import ModelInfo


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(resolve_model_dir("tiny"))


@pytest.fixture(scope="module")
def info(tok) -> ModelInfo:
    return ModelInfo(name="tiny", model_dir=str(resolve_model_dir("tiny")), max_model_len=512,
                     vocab_size=tok.vocab_size, max_request_tokens=512, eos_token_ids=(1,))

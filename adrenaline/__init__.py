"""Adrenaline: LLM serving with prefill/decode disaggregation and decode-attention offloading."""

from adrenaline.engine.llm import LLM
from adrenaline.errors import ConfigError, InvalidRequestError
from adrenaline.sampling_params import RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "ConfigError", "InvalidRequestError"]

"""Structured output: a JSON-schema grammar (xgrammar, on CPU) masking each sampled token.

A request with ``params.json_schema`` carries a ``GrammarState`` (its xgrammar matcher)
in its engine. The state is never shipped between workers: every engine that takes the
request in (prefill, decode after a handoff, a local or offloaded adoption, a recovery
rerun) rebuilds it from the schema and replays the request's output tokens, so the mask
depends only on the tokens produced so far, wherever the next one is sampled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adrenaline.errors import InvalidRequestError


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""
        if self._matcher.is_terminated():
            return False
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The value is complete and a stop token was accepted."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


CACHE_LIMIT_BYTES = 256 << 20  # compiled grammars kept (xgrammar's cache, by schema)


class GrammarCompiler:
    """Compiles schemas for one model's tokenizer (xgrammar caches compiled grammars)."""

    def __init__(self, model_dir: Path, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler = None

    def _xgr(self):
        import xgrammar as xgr

        if self._compiler is None:
            if not (self.model_dir / "tokenizer.json").is_file():
                raise InvalidRequestError("structured output needs the model's tokenizer.json")
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_file=str(self.model_dir / "tokenizer.json"))
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1,
                                                 cache_limit_bytes=CACHE_LIMIT_BYTES)
        return xgr

    def compile(self, schema: str):
        """The compiled grammar of ``schema`` (InvalidRequestError if it is not a usable schema)."""
        xgr = self._xgr()
        try:
            # Compact JSON (no free whitespace): a model cannot pad its output forever.
            grammar = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError on bad schemas
            raise InvalidRequestError(f"response_format: unusable JSON schema: {e}") from None
        return xgr.GrammarMatcher(grammar)

    def state(self, schema: str, output_token_ids: list[int]) -> GrammarState:
        """A fresh state for ``schema`` advanced over the tokens already produced."""
        state = GrammarState(self.compile(schema))
        for t in output_token_ids:
            if not state.accept(t):
                raise InvalidRequestError(f"output token {t} does not fit the request's grammar")
        return state


def apply_grammar_masks(logits: torch.Tensor, states: list[tuple[int, GrammarState]]) -> None:
    """Mask, in place, the tokens each (row, state) grammar forbids next (to -inf)."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, state in states:
        state.fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[row for row, _ in states])

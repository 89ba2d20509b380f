"""Prompt logprobs in responses: the echo + logprobs section and vLLM's ``prompt_logprobs``.

Input, per prompt token: a dict {token id: logprob} holding the prompt token and the
top-k at its position (None for the first token, which nothing precedes), and the
prompt token's rank in the vocabulary (engine/prompt_logprobs.py computes both).
"""

from __future__ import annotations

from adrenaline.model.tokenizer import Tokenizer


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def echo_logprobs(tokenizer: Tokenizer | None, prompt_ids: list[int],
                  entries: list[dict[int, float] | None] | None, k: int) -> dict[str, list]:
    """OpenAI's legacy completions logprobs of the echoed prompt: per prompt token its text,
    logprob (null for the first), top-k {text: logprob} with the token itself (null for the
    first) and text offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    offset = 0
    for i, tok_id in enumerate(prompt_ids):
        entry = entries[i] if entries is not None and i < len(entries) else None
        text = _token_text(tokenizer, tok_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if not entry:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp = entry[tok_id]
        out["token_logprobs"].append(lp)
        top = {_token_text(tokenizer, t): v for t, v in _top(entry, k)}
        top.setdefault(text, lp)
        out["top_logprobs"].append(top)
    return out


def vllm_prompt_logprobs(tokenizer: Tokenizer | None, prompt_ids: list[int],
                         entries: list[dict[int, float] | None] | None,
                         ranks: list[int | None] | None, k: int) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token null (the first) or {"<token id>":
    {"logprob", "rank", "decoded_token"}} for the token and the top-k."""
    if entries is None:
        return None
    out: list = []
    for i, tok_id in enumerate(prompt_ids):
        entry = entries[i] if i < len(entries) else None
        if not entry:
            out.append(None)
            continue
        rank = ranks[i] if ranks is not None and i < len(ranks) else None
        item = {str(tok_id): {"logprob": entry[tok_id], "rank": rank,
                              "decoded_token": _token_text(tokenizer, tok_id)}}
        for r, (t, v) in enumerate(_top(entry, k), start=1):
            item.setdefault(str(t), {"logprob": v, "rank": r,
                                     "decoded_token": _token_text(tokenizer, t)})
        out.append(item)
    return out

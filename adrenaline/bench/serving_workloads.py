"""Request sets and arrival times for the serving benchmark.

Datasets (every sampler is deterministic given its seed):

- ``random``: vLLM's random dataset. Input lengths uniform on
  [input_len * (1 - range_ratio), input_len * (1 + range_ratio)], output lengths likewise,
  token ids uniform on [10, vocab_size - 10). Prompts are token-id lists.
- ``sharegpt-synthetic``: ShareGPT-shaped lengths without the data. Lengths are
  ``round(median * exp(sigma * N(0, 1)))`` (a lognormal with the given median), clipped to
  [4, max_input] / [4, max_output] and to input + output <= max_model_len. Defaults:
  input median = ``input_len`` (128), sigma 1.0; output median = ``output_len`` (128), sigma
  0.8; max_input 1024, max_output 1024, max_model_len 2048 -- the heavy right tail of
  ShareGPT-V3 (vLLM's filtered set) at a CPU-friendly scale. Prompts are token-id lists.
- ``sharegpt``: a ShareGPT JSON file, a list of
  ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``.
  As vLLM: the first turn is the prompt (text), the second's token count the output length
  (unless ``fixed_output_len``); conversations with fewer than 2 turns, prompt or output
  shorter than 4 tokens, prompt over 1024 or prompt + output over 2048 tokens are dropped;
  the rest are shuffled with the seed and the first ``num_prompts`` kept.

- ``multi-turn``: synthetic conversations. Every conversation starts with the same
  ``system_len``-token system prompt; turn k's prompt is the conversation so far (system
  prompt, earlier user messages of ``user_len`` tokens, earlier answers of ``answer_len``
  tokens) plus a new ``user_len``-token message, and asks for ``output_len`` tokens. So
  every turn after the first repeats the previous prompt whole as its prefix.
  ``history_fraction`` reports the share of prompt tokens that precede the new message.
- ``sharegpt-multi-turn``: the same from a ShareGPT file: conversations with at least
  ``turns`` human/gpt pairs; turn k's prompt is the text of every earlier turn plus the k-th
  human message (joined by newlines), its output length the k-th reply's token count.
  Conversations whose last prompt + output exceeds ``max_model_len`` are dropped.
- ``long-decode``: decode-heavy requests, the kind with long generated answers (reasoning
  traces): prompt lengths uniform on [100, 300], output lengths uniform on [1000, 2000],
  seeded. With a tokenizer the prompts are chat-like (questions asking for a long,
  step-by-step answer, cut to the drawn length in tokens); without one, random token ids.

Multi-turn arrivals (``multi_turn_schedule``): conversation c starts at the c-th offset of
``arrival_offsets(conversation_rate)`` and sends turn k at start + k * ``turn_gap_s``: a
fixed schedule, so every system gets the same requests at the same times (open loop; the
gap stands for the user's reading and typing).

Arrivals (vLLM's ``get_request``): with rate ``inf`` every request starts at 0; otherwise the
gaps are Gamma(shape=burstiness, scale=1 / (rate * burstiness)) -- mean 1 / rate for every
burstiness, burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_TOKENS = 4
SYNTH_INPUT_SIGMA = 1.0
SYNTH_OUTPUT_SIGMA = 0.8


@dataclass(frozen=True)
class SampleRequest:
    """One request to send: the prompt (token ids or text), its length, the output length."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int
    history_len: int = 0  # multi-turn: prompt tokens before the new message (earlier turns)


def _uniform_lens(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> list[int]:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def _token_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return [int(x) for x in rng.integers(10, vocab_size - 10, size=n)]


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[SampleRequest]:
    """vLLM's random dataset with token-id prompts."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    ins = _uniform_lens(rng, num_prompts, input_len, range_ratio)
    outs = _uniform_lens(rng, num_prompts, output_len, range_ratio)
    return [SampleRequest(_token_ids(rng, i, vocab_size), i, o) for i, o in zip(ins, outs)]


def synthetic_sharegpt_lengths(num_prompts: int, input_median: int = 128, output_median: int = 128,
                               seed: int = 0, max_input: int = 1024, max_output: int = 1024,
                               max_model_len: int = 2048) -> list[tuple[int, int]]:
    """(input, output) length pairs from the lognormals documented above."""
    rng = np.random.default_rng(seed)
    pairs = []
    for z_in, z_out in rng.standard_normal((num_prompts, 2)):
        i = int(np.clip(round(input_median * math.exp(SYNTH_INPUT_SIGMA * z_in)), MIN_TOKENS, max_input))
        o = int(np.clip(round(output_median * math.exp(SYNTH_OUTPUT_SIGMA * z_out)), MIN_TOKENS,
                        max_output))
        pairs.append((i, max(MIN_TOKENS, min(o, max_model_len - i))))
    return pairs


def synthetic_sharegpt_requests(num_prompts: int, vocab_size: int, input_median: int = 128,
                                output_median: int = 128, seed: int = 0, max_model_len: int = 2048
                                ) -> list[SampleRequest]:
    rng = np.random.default_rng(seed + 1)
    return [SampleRequest(_token_ids(rng, i, vocab_size), i, o) for i, o in
            synthetic_sharegpt_lengths(num_prompts, input_median, output_median, seed,
                                       max_model_len=max_model_len)]


LONG_DECODE_INPUT = (100, 300)
LONG_DECODE_OUTPUT = (1000, 2000)
_QUESTIONS = (
    "Explain step by step how a compiler turns source code into machine code.",
    "Work through the proof that there are infinitely many prime numbers, then extend it.",
    "Plan a two-week trip through Japan day by day, with reasons for each choice.",
    "Derive the formula for the sum of a geometric series and check it on three examples.",
    "Describe how a city water system works, from the reservoir to the tap, in detail.",
    "Reason through why the sky is blue and why sunsets are red, covering the physics.",
    "Write a detailed study guide for the causes and effects of the industrial revolution.",
    "Solve a scheduling puzzle for five people with conflicting constraints, showing work.",
)


def long_decode_lengths(num_prompts: int, seed: int = 0) -> list[tuple[int, int]]:
    """(input, output) length pairs of the ``long-decode`` dataset."""
    rng = np.random.default_rng(seed)
    ins = rng.integers(LONG_DECODE_INPUT[0], LONG_DECODE_INPUT[1] + 1, size=num_prompts)
    outs = rng.integers(LONG_DECODE_OUTPUT[0], LONG_DECODE_OUTPUT[1] + 1, size=num_prompts)
    return [(int(i), int(o)) for i, o in zip(ins, outs)]


def long_decode_requests(num_prompts: int, vocab_size: int, seed: int = 0,
                         encode: Callable[[str], list[int]] | None = None) -> list[SampleRequest]:
    """The ``long-decode`` dataset: token-id prompts of exactly the drawn lengths."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for k, (i, o) in enumerate(long_decode_lengths(num_prompts, seed)):
        if encode is None:
            ids = _token_ids(rng, i, vocab_size)
        else:  # questions until the length is reached, cut to exactly i tokens
            ids: list[int] = []
            j = k
            while len(ids) < i:
                ids += encode(f"User {k}: {_QUESTIONS[j % len(_QUESTIONS)]} Think it through "
                              "carefully and answer at length.\n")
                j += 1
            ids = ids[:i]
        out.append(SampleRequest(ids, i, o))
    return out


class DatasetError(ValueError):
    """A dataset file that cannot be read as the format it claims; the message names the file."""


def load_sharegpt(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) texts: the first two turns of every conversation with >= 2 turns.

    Raises DatasetError naming the file and the entry for a file that is not JSON, not a list,
    or has an entry without ``conversations`` (a list of ``{"value": str}`` turns)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"cannot read ShareGPT file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a ShareGPT file is a JSON list of conversations, "
                           f"got {type(data).__name__}")
    pairs = []
    for i, entry in enumerate(data):
        conv = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(conv, list):
            raise DatasetError(f"{path}: entry {i} has no \"conversations\" list")
        if len(conv) < 2:
            continue
        turns = []
        for j, turn in enumerate(conv[:2]):
            value = turn.get("value") if isinstance(turn, dict) else None
            if not isinstance(value, str):
                raise DatasetError(f"{path}: entry {i}, turn {j} has no string \"value\"")
            turns.append(value)
        pairs.append((turns[0], turns[1]))
    return pairs


def sharegpt_requests(path: str, num_prompts: int, encode: Callable[[str], list[int]],
                      fixed_output_len: int | None = None, seed: int = 0) -> list[SampleRequest]:
    """Text prompts from a ShareGPT JSON file, filtered as vLLM does (see module docstring)."""
    convs = load_sharegpt(path)
    random.Random(seed).shuffle(convs)
    out: list[SampleRequest] = []
    for prompt, completion in convs:
        if len(out) == num_prompts:
            break
        prompt_len = len(encode(prompt))
        output_len = fixed_output_len or len(encode(completion))
        if prompt_len < MIN_TOKENS or output_len < MIN_TOKENS:
            continue
        if prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        out.append(SampleRequest(prompt, prompt_len, output_len))
    return out


def arrival_offsets(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
                    ) -> list[float]:
    """Send time of each request, seconds after the benchmark starts: non-decreasing, the first
    always 0 (vLLM sends the first request at once, then sleeps each gap)."""
    if math.isinf(request_rate):
        return [0.0] * num
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    return [0.0] + [float(x) for x in np.cumsum(gaps[:-1])]


def multi_turn_conversations(num_conversations: int, turns: int, vocab_size: int,
                             system_len: int = 128, user_len: int = 96, answer_len: int = 32,
                             output_len: int = 32, seed: int = 0) -> list[list[SampleRequest]]:
    """Synthetic conversations (see the module docstring); one request list per conversation."""
    if num_conversations <= 0 or turns <= 0:
        raise ValueError("num_conversations and turns must be > 0")
    rng = np.random.default_rng(seed)
    system = _token_ids(rng, system_len, vocab_size)
    convs = []
    for _ in range(num_conversations):
        history, reqs = list(system), []
        for _ in range(turns):
            prompt = history + _token_ids(rng, user_len, vocab_size)
            reqs.append(SampleRequest(prompt, len(prompt), output_len, history_len=len(history)))
            history = prompt + _token_ids(rng, answer_len, vocab_size)
        convs.append(reqs)
    return convs


def load_sharegpt_conversations(path: str) -> list[list[str]]:
    """Every conversation's turn texts, human and gpt alternating (see load_sharegpt)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ShareGPT file {path}: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a ShareGPT file is a JSON list of conversations")
    out = []
    for i, entry in enumerate(data):
        conv = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(conv, list):
            raise DatasetError(f"{path}: entry {i} has no \"conversations\" list")
        texts = [t.get("value") if isinstance(t, dict) else None for t in conv]
        if any(not isinstance(t, str) for t in texts):
            raise DatasetError(f"{path}: entry {i} has a turn without a string \"value\"")
        out.append(texts)
    return out


def sharegpt_multi_turn(path: str, num_conversations: int, turns: int,
                        encode: Callable[[str], list[int]], max_model_len: int = 2048,
                        seed: int = 0) -> list[list[SampleRequest]]:
    """Text multi-turn conversations from a ShareGPT file (see the module docstring)."""
    convs = [c for c in load_sharegpt_conversations(path) if len(c) >= 2 * turns]
    random.Random(seed).shuffle(convs)
    out: list[list[SampleRequest]] = []
    for texts in convs:
        if len(out) == num_conversations:
            break
        reqs, history = [], ""
        for k in range(turns):
            prompt = history + texts[2 * k]
            prompt_len, output_len = len(encode(prompt)), len(encode(texts[2 * k + 1]))
            reqs.append(SampleRequest(prompt, prompt_len, max(output_len, MIN_TOKENS),
                                      history_len=len(encode(history)) if history else 0))
            history = prompt + "\n" + texts[2 * k + 1] + "\n"
        if reqs[-1].prompt_len + reqs[-1].output_len <= max_model_len:
            out.append(reqs)
    return out


def multi_turn_schedule(convs: list[list[SampleRequest]], conversation_rate: float,
                        turn_gap_s: float, burstiness: float = 1.0, seed: int = 0
                        ) -> tuple[list[SampleRequest], list[float]]:
    """(requests, send offsets) sorted by offset: conversation starts paced by
    ``arrival_offsets``, turn k at start + k * turn_gap_s."""
    starts = arrival_offsets(len(convs), conversation_rate, burstiness, seed)
    timed = sorted(((start + k * turn_gap_s, c, k, req) for c, (start, conv) in
                    enumerate(zip(starts, convs)) for k, req in enumerate(conv)),
                   key=lambda x: x[:3])
    return [x[3] for x in timed], [x[0] for x in timed]


def history_fraction(requests: list[SampleRequest]) -> float:
    """Share of all prompt tokens that repeat earlier turns (0 for no requests)."""
    total = sum(r.prompt_len for r in requests)
    return sum(r.history_len for r in requests) / total if total else 0.0

"""Locust load test of the OpenAI-compatible API.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI
    locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s --host ... --csv out

Each user mixes completions and chat, streamed and not, over short/medium/long prompts
(token-id prompts for completions, so lengths are exact; ``ignore_eos`` fixes output
lengths). Streamed requests also report, as their own request types:

- ``TTFT``: ms from sending to the first token chunk (name = the endpoint's name),
- ``TPOT``: ms per output token after the first, (E2E - TTFT) / (n_out - 1), only when
  n_out > 1 (n_out from the usage chunk),
so Locust's stats and CSVs carry their percentiles next to the request rows.

``MultiTurnUser`` (one user in four by default; run it alone with
``locust -f loadtests/locustfile.py MultiTurnUser ...``) holds a conversation: every turn's
prompt is the conversation so far (a system prompt shared by all users, earlier messages,
earlier answers) plus a new message, streamed, named ``multi-turn [turn k]``; after
``ADRENALINE_TURNS`` turns (default 4) it starts a new conversation. With prefix caching the
server recomputes only the new part of each turn (see /metrics'
``adrenaline_worker_prefix_cache_hit_ratio``).

``ADRENALINE_DATASET=long-decode`` makes every request of ``OpenAIUser`` a decode-heavy one
instead, with the lengths of ``bench serving --dataset long-decode`` (prompts of 100-300
tokens, outputs of 1,000-2,000), streamed completions only, named ``long-decode``.

Environment: ``ADRENALINE_MODEL`` (default "tiny"), ``ADRENALINE_VOCAB`` (default 4096),
``ADRENALINE_MAX_TOKENS`` (default 16), ``ADRENALINE_TURNS`` (default 4),
``ADRENALINE_DATASET`` (default: the mix above).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, between, events, task

from adrenaline.bench.serving_workloads import LONG_DECODE_INPUT, LONG_DECODE_OUTPUT

MODEL = os.environ.get("ADRENALINE_MODEL", "tiny")
VOCAB = int(os.environ.get("ADRENALINE_VOCAB", "4096"))
MAX_TOKENS = int(os.environ.get("ADRENALINE_MAX_TOKENS", "16"))
TURNS = int(os.environ.get("ADRENALINE_TURNS", "4"))
DATASET = os.environ.get("ADRENALINE_DATASET", "mix")
PROMPT_LENS = {"short": 16, "medium": 128, "long": 512}
SYSTEM_PROMPT = [random.Random(0).randrange(10, VOCAB - 10) for _ in range(64)]
MESSAGE_LEN = 48  # tokens of each user message
WORDS = "the llama walks over the green hill and sees a quiet river under a bright sky".split()


def _fire(kind: str, name: str, ms: float) -> None:
    events.request.fire(request_type=kind, name=name, response_time=ms, response_length=0,
                        exception=None, context={})


class OpenAIUser(FastHttpUser):
    """One client; the weights pick a request shape per task run."""

    weight = 3
    wait_time = between(0.05, 0.2)

    def _size(self) -> tuple[str, int]:
        label = random.choices(list(PROMPT_LENS), weights=[5, 3, 1])[0]
        return label, PROMPT_LENS[label]

    def _completion_body(self, n: int, stream: bool) -> dict:
        return {"model": MODEL, "prompt": [random.randrange(10, VOCAB - 10) for _ in range(n)],
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}

    def _chat_body(self, n: int, stream: bool) -> dict:
        text = " ".join(random.choice(WORDS) for _ in range(max(1, n // 2)))
        return {"model": MODEL, "messages": [{"role": "user", "content": text}],
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}

    @task(3)
    def completion(self) -> None:
        label, n = self._size()
        with self.client.post("/v1/completions", json=self._completion_body(n, False),
                              name=f"completions [{label}]", catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("choices"):
                r.failure(f"HTTP {r.status_code}")

    @task(3)
    def completion_stream(self) -> None:
        label, n = self._size()
        self._stream("/v1/completions", self._completion_body(n, True),
                     f"completions stream [{label}]")

    @task(2)
    def chat(self) -> None:
        label, n = self._size()
        with self.client.post("/v1/chat/completions", json=self._chat_body(n, False),
                              name=f"chat [{label}]", catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("choices"):
                r.failure(f"HTTP {r.status_code}")

    @task(2)
    def chat_stream(self) -> None:
        label, n = self._size()
        self._stream("/v1/chat/completions", self._chat_body(n, True), f"chat stream [{label}]")

    def _stream(self, path: str, body: dict, name: str) -> None:
        stream_request(self.client, path, body, name)


class MultiTurnUser(FastHttpUser):
    """One conversation at a time; each turn repeats the whole conversation so far."""

    weight = 1
    wait_time = between(0.5, 1.5)  # the user reads the answer and types

    def on_start(self) -> None:
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.history = list(SYSTEM_PROMPT)
        self.turn = 0

    @task
    def next_turn(self) -> None:
        if self.turn == TURNS:
            self._new_conversation()
        self.turn += 1
        prompt = self.history + [random.randrange(10, VOCAB - 10) for _ in range(MESSAGE_LEN)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        stream_request(self.client, "/v1/completions", body, f"multi-turn [turn {self.turn}]")
        # The answer joins the history (token ids stand for its text: the lengths are exact).
        self.history = prompt + [random.randrange(10, VOCAB - 10) for _ in range(MAX_TOKENS)]


class LongDecodeUser(FastHttpUser):
    """Decode-heavy requests only (``ADRENALINE_DATASET=long-decode``): streamed completions
    of a 100-300 token prompt and a 1,000-2,000 token answer."""

    wait_time = between(0.05, 0.2)

    @task
    def long_decode(self) -> None:
        n = random.randint(*LONG_DECODE_INPUT)
        body = {"model": MODEL, "prompt": [random.randrange(10, VOCAB - 10) for _ in range(n)],
                "max_tokens": random.randint(*LONG_DECODE_OUTPUT), "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        stream_request(self.client, "/v1/completions", body, "long-decode")


# The users this run spawns: the decode-heavy one alone, or the mix.
if DATASET == "long-decode":
    del OpenAIUser, MultiTurnUser
else:
    del LongDecodeUser


def stream_request(client, path: str, body: dict, name: str) -> None:
    """POST a streamed request; report it, and its TTFT and TPOT as their own rows."""
    start = time.perf_counter()
    first = None
    n_out = 0
    with client.post(path, json=body, name=name, stream=True, catch_response=True) as r:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}")
            return
        buf, done = b"", False
        while piece := r.stream.read(4096):
            buf += piece
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n_out = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    delta = c.get("text") or (c.get("delta") or {}).get("content")
                    if delta and first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        if not done or first is None:
            r.failure("stream ended without [DONE] or without tokens")
            return
    _fire("TTFT", name, (first - start) * 1e3)
    if n_out > 1:
        _fire("TPOT", name, ((end - start) - (first - start)) / (n_out - 1) * 1e3)

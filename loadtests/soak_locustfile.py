"""Locust users for the reliability soak (loadtests/soak.py): completions whose text is
checked against the offline engine, so a failure that loses, repeats or changes a token shows
up as a "mismatch" failure.

Each user sends, from a fixed pool of token-id prompts, non-streamed and streamed
completions, greedy for even prompts and sampled with the prompt's own seed for odd ones
(temperature 0.8, top_k 50: a rerun must not redraw them) (``max_tokens`` ADRENALINE_SOAK_MAX_TOKENS, default 32). Failures are named by
kind: ``HTTP <status>``, ``stream error: ...``, ``mismatch``.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, between, events, task

MAX_TOKENS = int(os.environ.get("ADRENALINE_SOAK_MAX_TOKENS", "32"))
NUM_PROMPTS = 48
EXPECTED: list[str] = []  # offline engine's text per prompt, filled at test start


def _sampling(i: int) -> dict:
    return {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_k": 50, "seed": i}


def _prompt(i: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(10, 4000) for _ in range(rng.randint(4, 64))]


@events.test_start.add_listener
def _expected(**_kw) -> None:
    from adrenaline import LLM, SamplingParams

    outs = LLM("tiny").generate([_prompt(i) for i in range(NUM_PROMPTS)],
                                [SamplingParams(max_tokens=MAX_TOKENS, **_sampling(i))
                                 for i in range(NUM_PROMPTS)])
    EXPECTED[:] = [o.text for o in outs]


class SoakUser(FastHttpUser):
    wait_time = between(0.05, 0.3)

    def _body(self, i: int, stream: bool) -> dict:
        return {"model": "tiny", "prompt": _prompt(i), "max_tokens": MAX_TOKENS,
                "stream": stream, **_sampling(i)}

    @task
    def completion(self) -> None:
        i = random.randrange(NUM_PROMPTS)
        with self.client.post("/v1/completions", json=self._body(i, False),
                              name="completion", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
            elif r.json()["choices"][0]["text"] != EXPECTED[i]:
                r.failure("mismatch")

    @task
    def completion_stream(self) -> None:
        i = random.randrange(NUM_PROMPTS)
        with self.client.post("/v1/completions", json=self._body(i, True), name="stream",
                              stream=True, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            buf, text, done, error = b"", [], False, None
            while piece := r.stream.read(4096):
                buf += piece
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if line == b"data: [DONE]":
                        done = True
                    elif line.startswith(b"data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = chunk["error"]["message"][:80]
                        for c in chunk.get("choices") or []:
                            text.append(c.get("text") or "")
            if error is not None:
                r.failure(f"stream error: {error}")
            elif not done:
                r.failure("stream ended without [DONE]")
            elif "".join(text) != EXPECTED[i]:
                r.failure("mismatch")

"""HTTP load for the multi-node tests, run inside a node's namespace (``python -m ...load``).

Sends ``--n`` concurrent completions (greedy, the prompts of ``prompts(n, seed)``) and
prints one JSON object: per request its text, HTTP status, 503 retries and error, plus the
wall-clock time (time.time()) of every streamed chunk, so the caller can time a stall.

A 503 with Retry-After before any token (no placement possible) is retried after the
time it names, as a client should; an error after tokens were streamed is reported
(such a request is lost: nothing resumes it). ``--progress FILE`` gets the number of
chunks seen so far, rewritten as they arrive, to time a fault mid-load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 4000) for _ in range(rng.randint(3, 40))] for _ in range(n)]


async def _one(client, url: str, body: dict, stream: bool, chunk_times: list[float],
               progress) -> dict:
    out = {"text": "", "status": None, "retries_503": 0, "error": None, "finish_reason": None}
    while True:
        if not stream:
            r = await client.post(url, json=body)
            out["status"] = r.status_code
            if r.status_code == 503 and "retry-after" in r.headers:
                out["retries_503"] += 1
                await asyncio.sleep(float(r.headers["retry-after"]))
                continue
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                out["text"], out["finish_reason"] = choice["text"], choice["finish_reason"]
                chunk_times.append(time.time())
                progress()
            else:
                out["error"] = r.text
            return out
        async with client.stream("POST", url, json={**body, "stream": True}) as r:
            out["status"] = r.status_code
            if r.status_code == 503 and "retry-after" in r.headers:
                out["retries_503"] += 1
                await r.aread()
                await asyncio.sleep(float(r.headers["retry-after"]))
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = data["error"]
                    continue
                choice = data["choices"][0]
                out["text"] += choice["text"]
                out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
                chunk_times.append(time.time())
                progress()
            if r.status_code != 200:
                out["error"] = out["error"] or (await r.aread()).decode(errors="replace")
            return out


async def run(base_url: str, n: int, seed: int, max_tokens: int, stream: bool,
              progress_file: str | None, model: str = "tiny") -> dict:
    import httpx

    chunk_times: list[float] = []
    count = [0]

    def progress() -> None:
        count[0] += 1
        if progress_file and count[0] % 4 == 0:
            with open(progress_file, "w") as f:
                f.write(str(count[0]))

    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                   "ignore_eos": True} for p in prompts(n, seed)]
        results = await asyncio.gather(*[_one(client, "/v1/completions", b, stream,
                                              chunk_times, progress) for b in bodies])
    return {"results": results, "chunk_times": sorted(chunk_times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--progress")
    a = ap.parse_args()
    out = asyncio.run(run(a.url, a.n, a.seed, a.max_tokens, a.stream, a.progress))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

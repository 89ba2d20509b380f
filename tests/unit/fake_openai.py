"""A fake OpenAI-style completions server for the serving benchmark's tests (no model, no Ray).

``/v1/completions`` streams ``max_tokens`` one-token chunks, the first after ``ttft_s`` and the
rest ``itl_s`` apart, then a usage chunk and ``[DONE]``. ``/metrics`` serves the gauges the
sweep samples, in adrenaline's names: decode KV blocks used = streams in flight (of 10), an
executor whose attention has read ``bytes_per_s`` bytes per second since start, and an offload
ratio of 0.5. ``stats()`` counts placements: every other request is "offloaded".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from adrenaline.bench.serving_sweep import Endpoint

KV_BLOCKS = 10


class FakeServer:
    def __init__(self, ttft_s: float, itl_s: float, bytes_per_s: float = 1e9):
        self.ttft_s, self.itl_s, self.bytes_per_s = ttft_s, itl_s, bytes_per_s
        self.in_flight = 0
        self.num_placed = 0
        self.t0 = time.monotonic()
        self.app = app = FastAPI()

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            lbl_d, lbl_e = 'role="decode",index="0"', 'role="executor",index="0"'
            read = self.bytes_per_s * (time.monotonic() - self.t0)
            return PlainTextResponse(
                f"adrenaline_worker_kv_blocks_used{{{lbl_d}}} {self.in_flight}\n"
                f"adrenaline_worker_kv_blocks_free{{{lbl_d}}} {KV_BLOCKS - self.in_flight}\n"
                f"adrenaline_worker_kv_blocks_used{{{lbl_e}}} 0\n"
                f"adrenaline_worker_kv_blocks_free{{{lbl_e}}} {KV_BLOCKS}\n"
                f"adrenaline_worker_attention_kv_bytes_read{{{lbl_e}}} {read}\n"
                "adrenaline_offload_ratio 0.5\n")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = json.loads(await request.body())
            n, prompt = body["max_tokens"], body["prompt"]
            self.num_placed += 1
            return StreamingResponse(self._stream(n, len(prompt)), media_type="text/event-stream")

    async def _stream(self, n: int, prompt_len: int):
        self.in_flight += 1
        try:
            await asyncio.sleep(self.ttft_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(self.itl_s)
                choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    def stats(self) -> dict:
        return {"num_placed": self.num_placed, "num_offloaded": self.num_placed // 2}

    @contextmanager
    def running(self, with_stats: bool = True) -> Iterator[Endpoint]:
        """Serve on a free loopback port in a thread; yields the endpoint."""
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.02)
        try:
            yield Endpoint(f"http://127.0.0.1:{port}", "fake",
                           stats=self.stats if with_stats else None)
        finally:
            server.should_exit = True
            thread.join(timeout=10)

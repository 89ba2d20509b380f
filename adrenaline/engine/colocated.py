"""One device, one process: a prefill engine, an attention executor and a decode engine.

The layout of a single GPU shared by all three roles, each with its own
slice of the memory (its own KV budget): prompts are prefilled on the
prefill engine; each prefilled request's KV is handed off on the same device
(a device-to-device block copy, no host staging) either into the decode
engine's pool (local) or into the executor's pool (offloaded). Decode steps
then run with the offloaded requests' attention on the executor, which
serves them on its own thread through an in-process communicator
(transport/local.py), exactly as a decode worker and its executors do
across processes.

Invariants: an offloaded request's KV is never allocated on the decode
engine; when ``generate`` returns, every block of all three pools is free.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence

import torch

from adrenaline.config import EngineConfig
from adrenaline.engine.attention_service import AttentionService
from adrenaline.engine.core import EngineCore
from adrenaline.engine.remote_attention import RemoteAttention
from adrenaline.engine.request import Request
from adrenaline.sampling_params import SamplingParams
from adrenaline.transport.local import LocalWorld

DECODE_RANK, EXECUTOR_RANK = 0, 1


class ColocatedPD:
    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto",
                 prefill: EngineConfig | None = None, decode: EngineConfig | None = None,
                 executor: EngineConfig | None = None, executor_stream=None):
        self.prefill = EngineCore(model, dtype=dtype, device=device, config=prefill)
        self.decode = EngineCore(model, dtype=dtype, device=device, config=decode)
        mc = self.decode.model_config
        self.executor = AttentionService(mc, executor or EngineConfig(), self.decode.dtype,
                                         self.decode.device)
        self._world = LocalWorld(2)
        self.decode.runner.remote = RemoteAttention(
            self._world.communicator(DECODE_RANK), [EXECUTOR_RANK], mc.num_attention_heads,
            mc.num_key_value_heads, mc.head_dim)
        # On CUDA, the executor's kernels may run on their own stream: a green-context
        # stream gives it a bounded share of the SMs (its "slice" of the device).
        self._executor_stream = executor_stream
        self._executor_error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="attention-executor", daemon=True)
        self._thread.start()
        self._ids = itertools.count()
        self.num_offloaded = 0

    def _serve(self) -> None:
        comm = self._world.communicator(EXECUTOR_RANK)
        try:
            if self._executor_stream is not None:
                torch.cuda.set_stream(self._executor_stream)  # this thread's current stream
            while not self._world.closed:
                self.executor.serve_step(comm, DECODE_RANK)
        except RuntimeError:
            if not self._world.closed:
                raise
        except BaseException as e:  # surfaced by the next generate()
            self._executor_error = e

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 offload: Callable[[int], bool] = lambda i: False) -> list[Request]:
        """Run every prompt through prefill -> handoff -> decode; ``offload(i)`` picks prompt i's side.

        Returns the finished requests in prompt order.
        """
        reqs = [self.prefill.add_request(f"colo-{next(self._ids)}", list(p), params)
                for p in prompts]
        while self.prefill.scheduler.waiting:
            self.prefill.prefill_step()
        for i, r in enumerate(reqs):
            if r.finish_reason is None:
                self._handoff(r, offload(i))
        while self.decode.has_unfinished:
            if self._executor_error is not None:
                raise RuntimeError("attention executor failed") from self._executor_error
            for r in self.decode.step():
                if r.finish_reason is not None and r.is_offloaded:
                    self.executor.free(r.remote_handle)
        return reqs

    def _handoff(self, r: Request, offloaded: bool) -> None:
        """Move a prefilled request's KV, on the device, into the decode or the executor pool."""
        kv = self.prefill.export_kv(r.request_id)
        self.prefill.release(r.request_id)
        if offloaded:
            r.remote_handle = self.executor.adopt(r.request_id, r.num_tokens, r.num_computed, kv)
            r.executor = 0
            self.num_offloaded += 1
            self.decode.adopt(r, None)
        else:
            self.decode.adopt(r, kv)

    def blocks_in_use(self) -> dict[str, int]:
        return {"prefill": self.prefill.block_manager.num_used_blocks,
                "decode": self.decode.block_manager.num_used_blocks,
                "executor": self.executor.block_manager.num_used_blocks}

    def close(self) -> None:
        self._world.close()
        self._thread.join(timeout=10)
        if self.decode.device.type == "cuda":
            torch.cuda.synchronize(self.decode.device)

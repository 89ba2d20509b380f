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
from adrenaline.engine.inline_attention import InlineRemoteAttention
from adrenaline.engine.remote_attention import RemoteAttention
from adrenaline.engine.request import Request
from adrenaline.sampling_params import SamplingParams
from adrenaline.transport.local import LocalWorld

DECODE_RANK, EXECUTOR_RANK = 0, 1


class ColocatedPD:
    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto",
                 prefill: EngineConfig | None = None, decode: EngineConfig | None = None,
                 executor: EngineConfig | None = None, executor_stream=None,
                 inline: bool = False):
        self.prefill = EngineCore(model, dtype=dtype, device=device, config=prefill)
        self.decode = EngineCore(model, dtype=dtype, device=device, config=decode)
        mc = self.decode.model_config
        self.executor = AttentionService(mc, executor or EngineConfig(), self.decode.dtype,
                                         self.decode.device)
        # On CUDA, the executor's kernels may run on their own stream: a green-context
        # stream gives it a bounded share of the SMs (its "slice" of the device).
        self._executor_stream = executor_stream
        self._executor_error: BaseException | None = None
        self._world = LocalWorld(2)
        self._thread: threading.Thread | None = None
        if inline:  # the decode thread launches the executor's attention itself
            if executor_stream is None and self.decode.device.type == "cuda":
                executor_stream = torch.cuda.Stream(self.decode.device)
            self.decode.runner.remote = InlineRemoteAttention([self.executor], [executor_stream])
        else:  # the executor serves on its own thread, through the in-process communicator
            self.decode.runner.remote = RemoteAttention(
                self._world.communicator(DECODE_RANK), [EXECUTOR_RANK], mc.num_attention_heads,
                mc.num_key_value_heads, mc.head_dim)
            self._thread = threading.Thread(target=self._serve, name="attention-executor",
                                            daemon=True)
            self._thread.start()
        self._ids = itertools.count()
        self.num_offloaded = 0

    def _serve(self) -> None:
        comm = self._world.communicator(EXECUTOR_RANK)
        try:
            if self._executor_stream is not None:
                torch.cuda.set_stream(self._executor_stream)  # this thread's current stream
            with torch.inference_mode():
                while not self._world.closed:
                    self.executor.serve_step(comm, DECODE_RANK)
        except BaseException as e:
            if not self._world.closed:  # a failure, not close(): wake the decode side with it
                self._executor_error = e
                self._world.close()

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 offload: Callable[[int], bool] | str = lambda i: False) -> list[Request]:
        """Run every prompt through prefill -> handoff -> decode; returns them finished, in order.

        ``offload(i)`` fixes prompt i's side (True: the executor). ``offload="capacity"``
        places each request, in arrival order, locally while the decode pool has room
        for its whole output, else on the executor while that has room, else it waits.
        A request is admitted only when its side can hold its final length, so decode
        never preempts; its KV waits in the prefill pool until then.
        """
        reqs = [self.prefill.add_request(f"colo-{next(self._ids)}", list(p), params)
                for p in prompts]
        while self.prefill.scheduler.waiting:
            self.prefill.prefill_step()
        pending = [(i, r) for i, r in enumerate(reqs) if r.finish_reason is None]
        reserved = {False: 0, True: 0}  # blocks promised to admitted requests, per side
        owner: dict[str, tuple[bool, int]] = {}
        self.num_steps, self.batch_size_sum = 0, 0
        while pending or self.decode.has_unfinished:
            while pending:
                i, r = pending[0]
                need = self.decode.block_manager.blocks_for(
                    min(r.num_prompt_tokens + params.max_tokens, self.decode.max_model_len))
                side = self._side(i, need, reserved, offload)
                if side is None:
                    break
                pending.pop(0)
                reserved[side] += need
                owner[r.request_id] = (side, need)
                self._handoff(r, side)
            if not self.decode.has_unfinished:
                raise RuntimeError("a request fits neither the decode nor the executor KV budget")
            try:
                stepped = self.decode.step()
            except RuntimeError:
                if self._executor_error is not None:
                    raise RuntimeError("attention executor failed") from self._executor_error
                raise
            self.num_steps += 1
            self.batch_size_sum += len(stepped)
            for r in stepped:
                if r.finish_reason is None:
                    continue
                side, need = owner.pop(r.request_id)
                reserved[side] -= need
                if r.is_offloaded:
                    self.executor.free(r.remote_handle)
        return reqs

    def _side(self, i: int, need: int, reserved: dict[bool, int], offload) -> bool | None:
        """Where request i goes now (True: executor), or None to wait for room."""
        room = {False: self.decode.num_kv_blocks - reserved[False],
                True: self.executor.num_kv_blocks - reserved[True]}
        if offload == "capacity":
            return False if room[False] >= need else (True if room[True] >= need else None)
        side = bool(offload(i))
        return side if room[side] >= need else None

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
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.decode.device.type == "cuda":
            torch.cuda.synchronize(self.decode.device)

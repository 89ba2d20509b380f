"""Run an EngineCore from an asyncio actor: every engine call on one dedicated thread.

Invariant: the engine (scheduler, block manager, pool) is only touched from
this thread, so steps, admissions, handoffs and aborts never interleave; the
actor's event loop stays free to accept calls while a step runs.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from adrenaline.actors.pinning import thread_budget
from adrenaline.config import EngineConfig
from adrenaline.engine.core import EngineCore
from adrenaline.protocol import WorkerInfo
from adrenaline.app_config import AppArgs

T = TypeVar("T")


class EngineThread:
    def __init__(self, args: AppArgs, config: EngineConfig, cpus: list[int] | None = None):
        # On CPU an actor gets its thread budget (default 1: several actors share few cores;
        # a pinned role: one per core of its set).
        threads = thread_budget(config.num_threads, cpus)
        torch.set_num_threads(threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # Build on the engine thread too: torch's thread settings are per thread.
        self.core: EngineCore = self._pool.submit(
            lambda: _build(args, config, threads)).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def info(self) -> WorkerInfo:
        e = self.core
        return WorkerInfo(model_dir=str(e.model_dir), max_model_len=e.max_model_len,
                          vocab_size=e.model_config.vocab_size,
                          max_request_tokens=e.max_request_tokens,
                          eos_token_ids=e.model_config.eos_token_ids,
                          num_kv_blocks=e.num_kv_blocks, block_size=e.config.block_size,
                          prefix_caching=e.config.enable_prefix_caching)


def _build(args: AppArgs, config: EngineConfig, threads: int) -> EngineCore:
    torch.set_num_threads(threads)
    return EngineCore(args.model, dtype=args.dtype, device=args.device, config=config)

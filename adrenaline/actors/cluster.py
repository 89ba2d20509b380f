"""Cluster: creates the prefill and decode actors and wires their communicator world.

Ranks: prefill instance i is rank i, decode instance j is rank P + j, in one
world per cluster. Each actor is an asyncio actor; the cluster only creates
and connects them (the router routes).
"""

from __future__ import annotations

import ray
import ray.util

from adrenaline.actors.decode import DecodeWorker
from adrenaline.actors.prefill import PrefillWorker
from adrenaline.protocol import WorkerInfo
from adrenaline.serve.config import AppArgs, RoleConfig
from adrenaline.transport import find_free_port


def _actor(cls, role: RoleConfig, name: str):
    return ray.remote(cls).options(name=name, num_cpus=role.num_cpus, num_gpus=role.num_gpus,
                                   max_concurrency=1000, max_restarts=0)


class Cluster:
    def __init__(self, args: AppArgs, name_prefix: str = "adrenaline"):
        self.args = args
        self.prefill = [_actor(PrefillWorker, args.prefill, f"{name_prefix}-prefill-{i}").remote(args, i)
                        for i in range(args.prefill.num_instances)]
        self.decode = [_actor(DecodeWorker, args.decode, f"{name_prefix}-decode-{j}").remote(args, j)
                       for j in range(args.decode.num_instances)]
        self.prefill_info: list[WorkerInfo] = ray.get([a.info.remote() for a in self.prefill])
        self.decode_info: list[WorkerInfo] = ray.get([a.info.remote() for a in self.decode])
        self._connect()

    @property
    def workers(self) -> list:
        return self.prefill + self.decode

    def prefill_rank(self, i: int) -> int:
        return i

    def decode_rank(self, j: int) -> int:
        return len(self.prefill) + j

    def _connect(self) -> None:
        kind = self.args.transport
        if kind == "auto":
            kind = "nccl" if self.args.device == "cuda" else "gloo"
        if kind == "nccl":
            from adrenaline.transport.nccl import new_nccl_unique_id

            init = new_nccl_unique_id()
        else:
            init = f"tcp://{ray.util.get_node_ip_address()}:{find_free_port()}"
        world = len(self.workers)
        ray.get([w.connect.remote(kind, rank, world, init) for rank, w in enumerate(self.workers)])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)

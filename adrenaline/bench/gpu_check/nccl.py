"""Stage nccl: the cupy NCCL communicator up to what one GPU allows (id, 1-rank world)."""

from __future__ import annotations

from adrenaline.bench.gpu_check.common import Plan


def stage_nccl(plan: Plan, ctx: dict) -> dict:
    if plan.device.type != "cuda":
        return {"status": "skipped (CPU)"}
    from adrenaline.transport.nccl import NcclCommunicator, new_nccl_unique_id

    uid = new_nccl_unique_id()
    comm = NcclCommunicator(1, uid, 0)
    comm.close()
    return {"unique_id_bytes": len(bytes.fromhex(uid)), "one_rank_world": "init + close ok",
            "unverified": "send/recv between two ranks (needs two GPUs)"}

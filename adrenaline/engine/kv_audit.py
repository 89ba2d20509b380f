"""KV accounting audit: every page is owned by a live request or free, never both, never twice.

Each actor calls ``audit_kv`` with its block manager and the owners it
considers live (prefill: queued, prefilling or held requests; decode: running
requests that are not offloaded; executor: adopted handles). The result is a
``KVReport`` whose ``problems`` name every violation; an empty list is the
invariant holding. It is read-only: an audit never frees anything.
"""

from __future__ import annotations

from adrenaline.engine.block_manager import BlockManager, BlockManagerError
from adrenaline.protocol import KVReport


def audit_kv(role: str, index: int, bm: BlockManager, live: set[str],
             must_own: set[str] = frozenset()) -> KVReport:
    """Check ``bm`` against ``live`` (owners allowed to hold pages).

    ``must_own``: owners that must hold pages (e.g. a held prefill request).
    """
    problems: list[str] = []
    try:
        bm.check_invariants()
    except BlockManagerError as e:
        problems.append(str(e))
    owners = {seq: len(table) for seq, table in bm._tables.items()}
    for seq in sorted(set(owners) - live):
        problems.append(f"{owners[seq]} page(s) owned by {seq!r}, which is not a live request")
    for seq in sorted(must_own - set(owners)):
        problems.append(f"live request {seq!r} holds no pages")
    return KVReport(role=role, index=index, num_blocks=bm.num_blocks,
                    num_free=bm.num_free_blocks, owners=owners, problems=problems)

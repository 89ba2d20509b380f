"""KV accounting audit: every page is owned by a live request or free, never both, never twice.

Each actor calls ``audit_kv`` with its block manager and the owners it
considers live (prefill: queued, prefilling or held requests; decode: running
requests that are not offloaded; executor: adopted handles). The result is a
``KVReport`` whose ``problems`` name every violation; an empty list is the
invariant holding. It is read-only: an audit never frees anything.

With prefix caching a page may be shared by several live requests (its
reference count says how many), and a free page may still hold a cached
prefix block: the report counts those (``num_cached``: pages holding a
cached block, in use or not; ``num_evictable``: free pages among them), and
the block manager's own check verifies the reference counts and the cache's
maps.
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
                    num_free=bm.num_free_blocks, owners=owners, problems=problems,
                    num_cached=bm.num_cached_blocks, num_evictable=bm.num_evictable_blocks)

"""Prefix block hashes: the key of a full KV block in the prefix cache.

A full block's hash chains the previous block's hash with the block's own
token ids, so equal hashes mean equal token prefixes (up to a 64-bit digest
collision), not merely equal blocks. Only full blocks have hashes: a partial
last block is never shared. The hash is an unkeyed BLAKE2b digest, so every
process (prefill workers, the router) computes the same value for the same
tokens, whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT_HASH = 0  # the "previous hash" of a sequence's first block


def hash_block(parent: int, tokens) -> int:
    """The hash of one full block given its parent's hash and its token ids."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids, block_size: int, num_tokens: int | None = None,
                 start: int = 0, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of the full blocks among the first ``num_tokens`` tokens (default: all),
    beginning at block ``start`` whose parent hash is ``parent``."""
    n = len(token_ids) if num_tokens is None else num_tokens
    out: list[int] = []
    for b in range(start, n // block_size):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out

"""Point-to-point tensor transport between actors, outside Ray's object store.

Backends: ``gloo`` (CPU tensors, any host) and ``nccl`` (CUDA tensors). Each
is imported only when a communicator of its kind is made.
"""

from __future__ import annotations

from adrenaline.transport.base import CommHandle, Communicator
from adrenaline.transport.registry import KINDS, find_free_port, make_communicator

__all__ = ["CommHandle", "Communicator", "KINDS", "find_free_port", "make_communicator"]

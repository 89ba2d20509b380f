"""The point-to-point tensor transport contract every backend implements.

Hot-path tensors move between actors through a ``Communicator``, never
through Ray's object store; Ray only carries the small ``init`` string that
lets the ranks of one world find each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CommHandle(ABC):
    """An in-flight ``isend``/``irecv``.

    ``wait()`` returns once the operation is complete: for a send the buffer
    may be reused, for a recv the tensor holds the message. Calling it again
    is a no-op. The handle keeps every buffer the operation touches alive, so
    the caller may drop its own references before waiting; it must not write
    a sent tensor or read a received one before ``wait()`` returns.
    """

    @abstractmethod
    def wait(self) -> None: ...


class Communicator(ABC):
    """Point-to-point tensor messaging among the ``world_size`` ranks of one world.

    Contract:

    * ``rank`` is this member's index in ``[0, world_size)``.
    * ``send(tensor, dst, tag)`` returns once ``tensor`` may be reused. It may
      block until ``dst`` posts the matching receive, so two ranks exchanging
      data should use ``isend``/``irecv`` (or order their calls) to avoid
      deadlock.
    * ``recv(tensor, src, tag)`` fills a preallocated, contiguous ``tensor``
      whose shape and dtype equal the sender's; no metadata travels with a
      message. A byte-size mismatch is an error or a hang, never a partial fill.
    * Messages from one ``src`` to one ``dst`` with the same tag are matched
      in the order they were posted; different tags are independent unless
      the class sets ``independent_tags = False`` (then every message of a
      pair is matched in posting order, whatever its tag).
    * A zero-element tensor is a no-op on both sides.
    * ``close()`` releases the world; it is idempotent and no call but
      ``close()`` is valid after it.
    """

    # Whether messages with different tags between one pair are matched independently.
    independent_tags: bool = True

    rank: int
    world_size: int

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None: ...

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None: ...

    @abstractmethod
    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> CommHandle: ...

    @abstractmethod
    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> CommHandle: ...

    @abstractmethod
    def close(self) -> None: ...

    def set_spin(self, seconds: float) -> None:
        """How long a waiter busy-polls before it sleeps, where the transport polls (shm);
        others ignore it."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_peer(self, peer: int, tag: int) -> None:
        """Reject self-messages, out-of-world peers and negative tags."""
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"peer {peer} is not another rank of a world of {self.world_size} "
                             f"(this is rank {self.rank})")
        if tag < 0:
            raise ValueError(f"tag must be non-negative, got {tag}")


class DoneHandle(CommHandle):
    """The handle of an operation that completed when it was posted (e.g. zero elements)."""

    def wait(self) -> None:
        return None


def check_recv_buffer(tensor: torch.Tensor) -> None:
    """A receive buffer is written in place, so it must be contiguous."""
    if not tensor.is_contiguous():
        raise ValueError("recv needs a contiguous tensor; receive into a contiguous "
                         "buffer and copy into the strided view")

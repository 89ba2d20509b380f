"""PeerMesh: one rank's links to its peers, a two-rank world per peer.

A cluster numbers its actors with global ranks (see actors/cluster.py), and
the code that moves tensors addresses peers by those ranks. Underneath, each
pair of actors that exchange tensors has a world of its own, of two ranks,
so a lost peer breaks only its own link: the survivors' links keep working,
and the peer's replacement joins by forming new two-rank worlds with each
survivor (``link``), with no one else taking part. One world per cluster
could not do that: a gloo or NCCL world cannot take a new member.

Invariants: a link's two sides agree on who is rank 0 (the side that served
the rendezvous). A replaced link is kept (``_retired``), never closed here,
because a thread may still hold an operation on it; it raises once its dead
peer's sockets are gone. An operation on a peer without a link (never
linked, or marked lost by ``drop``) raises ``PeerLostError`` at once.
"""

from __future__ import annotations

import threading

import torch

from adrenaline.transport.base import CommHandle, Communicator


class PeerLostError(RuntimeError):
    """The link to ``peer`` is gone (the peer died, or was declared lost)."""

    def __init__(self, peer: int, cause: BaseException | None = None):
        super().__init__(f"the link to rank {peer} is lost"
                         + (f": {type(cause).__name__}: {cause}" if cause else ""))
        self.peer = peer


class _Link:
    def __init__(self, comm: Communicator, peer_rank: int, epoch: int):
        self.comm = comm
        self.peer_rank = peer_rank  # the peer's rank inside the two-rank world
        self.epoch = epoch


class PeerMesh(Communicator):
    """A ``Communicator`` over global ranks, each peer reached through its own world.

    Errors from a link's operations are raised as ``PeerLostError`` naming the peer,
    so a caller knows which peer failed.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self._links: dict[int, _Link] = {}
        self._retired: list[_Link] = []
        self._lock = threading.Lock()
        self.independent_tags = True

    def link(self, peer: int, comm: Communicator, peer_rank: int, epoch: int = 0) -> None:
        """Reach ``peer`` through ``comm`` (a two-rank world where it is ``peer_rank``)."""
        self._check_peer(peer, 0)
        with self._lock:
            old = self._links.get(peer)
            if old is not None:
                self._retired.append(old)
            self._links[peer] = _Link(comm, peer_rank, epoch)
            self.independent_tags &= comm.independent_tags

    def drop(self, peer: int, epoch: int | None = None) -> None:
        """Declare ``peer`` lost: its operations raise until it is linked again.

        With ``epoch``, only if its current link is still that epoch's (not a newer one)."""
        with self._lock:
            old = self._links.get(peer)
            if old is not None and (epoch is None or old.epoch == epoch):
                self._retired.append(self._links.pop(peer))

    def epoch(self, peer: int) -> int | None:
        """The epoch ``peer``'s current link was made with (None: no link)."""
        link = self._links.get(peer)
        return None if link is None else link.epoch

    def link_of(self, peer: int, epoch: int | None = None) -> tuple[Communicator, int]:
        """``peer``'s current link: (its two-rank world, the peer's rank there).

        With ``epoch``, the link must be the one made with that epoch (else PeerLostError):
        a caller holding work for one incarnation of a peer never reaches its replacement.
        """
        link = self._links.get(peer)
        if link is None or (epoch is not None and link.epoch != epoch):
            self._check_peer(peer, 0)
            raise PeerLostError(peer)
        return link.comm, link.peer_rank

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0,
             epoch: int | None = None) -> None:
        self.isend(tensor, dst, tag, epoch).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0,
             epoch: int | None = None) -> None:
        self.irecv(tensor, src, tag, epoch).wait()

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0,
              epoch: int | None = None) -> CommHandle:
        return self._post("isend", tensor, dst, tag, epoch)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0,
              epoch: int | None = None) -> CommHandle:
        return self._post("irecv", tensor, src, tag, epoch)

    def _post(self, op: str, tensor: torch.Tensor, peer: int, tag: int,
              epoch: int | None) -> CommHandle:
        comm, peer_rank = self.link_of(peer, epoch)
        try:
            return _MeshHandle(getattr(comm, op)(tensor, peer_rank, tag), peer)
        except Exception as e:  # the link is broken: its peer is lost
            raise PeerLostError(peer, e) from e

    def close(self) -> None:
        with self._lock:
            links = list(self._links.values()) + self._retired
            self._links, self._retired = {}, []
        for link in links:
            try:
                link.comm.close()
            except Exception:  # a broken world: nothing more to release
                pass


class _MeshHandle(CommHandle):
    def __init__(self, inner: CommHandle, peer: int):
        self._inner = inner
        self.peer = peer

    def wait(self) -> None:
        try:
            self._inner.wait()
        except Exception as e:
            raise PeerLostError(self.peer, e) from e

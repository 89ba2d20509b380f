"""PeerMesh (transport/mesh.py): global ranks over one two-rank world per peer."""

from __future__ import annotations

import pytest
import torch

from adrenaline.transport.local import LocalWorld
from adrenaline.transport.mesh import PeerLostError, PeerMesh


def _pair(mesh: PeerMesh, peer: int, epoch: int = 0) -> LocalWorld:
    """Link ``peer``: this side is rank 0 of a fresh two-rank world, the peer rank 1."""
    world = LocalWorld(2)
    mesh.link(peer, world.communicator(0), 1, epoch)
    return world


def test_messages_go_to_the_peer_named_by_global_rank():
    mesh = PeerMesh(0, 3)
    worlds = {1: _pair(mesh, 1), 2: _pair(mesh, 2)}
    for peer in (1, 2):
        mesh.send(torch.full((3,), float(peer)), peer, tag=5)
    for peer, world in worlds.items():
        got = torch.empty(3)
        world.communicator(1).recv(got, 0, 5)
        assert got.tolist() == [float(peer)] * 3
    worlds[2].communicator(1).send(torch.arange(4.0), 0, 6)
    got = torch.empty(4)
    mesh.recv(got, 2, tag=6)
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_lost_peer_breaks_only_its_link():
    mesh = PeerMesh(0, 3)
    lost, kept = _pair(mesh, 1), _pair(mesh, 2)
    pending = mesh.irecv(torch.empty(2), 1, tag=1)
    lost.close()  # what a dead peer's closed sockets do
    with pytest.raises(PeerLostError) as e:
        pending.wait()
    assert e.value.peer == 1
    mesh.send(torch.ones(2), 2, tag=1)  # the other link still works
    got = torch.empty(2)
    kept.communicator(1).recv(got, 0, 1)
    assert got.tolist() == [1.0, 1.0]


def test_epochs_keep_work_for_one_incarnation_away_from_the_next():
    mesh = PeerMesh(0, 2)
    _pair(mesh, 1, epoch=0)
    mesh.drop(1, epoch=0)
    assert mesh.epoch(1) is None
    with pytest.raises(PeerLostError):
        mesh.send(torch.ones(1), 1)  # no link until the replacement is linked
    new = _pair(mesh, 1, epoch=1)
    mesh.drop(1, epoch=0)  # a stale drop leaves the new link alone
    assert mesh.epoch(1) == 1
    with pytest.raises(PeerLostError):
        mesh.send(torch.ones(1), 1, epoch=0)  # meant for the lost incarnation
    mesh.send(torch.ones(1), 1, epoch=1)
    got = torch.empty(1)
    new.communicator(1).recv(got, 0, 0)
    assert got.tolist() == [1.0]


def test_bad_peers_are_value_errors():
    mesh = PeerMesh(1, 3)
    with pytest.raises(ValueError):
        mesh.link(1, LocalWorld(2).communicator(0), 1)  # itself
    with pytest.raises(ValueError):
        mesh.send(torch.ones(1), 3)  # outside the cluster

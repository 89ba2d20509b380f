"""Gloo binds to the interface holding the address Ray knows the node by (multi-node)."""

from __future__ import annotations

import subprocess
import sys

from adrenaline.transport.gloo import interface_of


def test_interface_of_finds_the_interface_holding_an_address():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.254") is None  # TEST-NET-3: on no interface here


def test_bind_ip_picks_gloo_interface():
    """Two ranks bound to 127.0.0.1 use `lo` and exchange a tensor (each in a process of
    its own: a process joins one torch.distributed world)."""
    from adrenaline.transport import find_free_port

    code = """
import os, sys, torch
from adrenaline.transport import make_communicator
rank = int(sys.argv[1])
c = make_communicator("gloo", rank, 2, sys.argv[2], timeout_s=60, bind_ip="127.0.0.1")
t = torch.arange(4.0)
if rank == 0:
    c.send(t, 1, 7)
else:
    c.recv(t.zero_(), 0, 7)
print(os.environ["GLOO_SOCKET_IFNAME"], t.tolist())
c.close()
"""
    init = f"tcp://127.0.0.1:{find_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), init], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [o.strip().splitlines()[-1] for o, _ in outs] == ["lo [0.0, 1.0, 2.0, 3.0]"] * 2

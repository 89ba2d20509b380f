"""One netns Ray cluster (head; prefill + executor; decode) for the multi-node tests.

Needs root and `ip netns` (CI runs as root); elsewhere these tests are skipped with the
reason. The cluster is torn down completely (processes, namespaces, temp directory)
when the module ends, whether its tests passed or not.
"""

from __future__ import annotations

import pytest

from tests.multinode.app import DECODE, HEAD, PREFILL
from tests.multinode.netns_cluster import NetnsCluster, available


@pytest.fixture(scope="module")
def netns_cluster():
    why = available()
    if why:
        pytest.skip(f"multi-node tests: {why}")
    cluster = NetnsCluster([HEAD, PREFILL, DECODE]).up()
    try:
        yield cluster
    finally:
        cluster.down()

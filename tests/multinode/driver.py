"""Ray driver commands run inside a node's namespace (``python -m tests.multinode.driver``).

The test process is outside every namespace, so whatever needs a Ray driver runs here, in
a subprocess, and prints one JSON line (``python -m tests.multinode.driver CMD APP ADDRESS``):

    placement APP   role-index -> node address of each of the app's live actors
    stats APP       the router's counters
    resources APP   the cluster's available resources
    audit APP       the KV audit (see tests/integration/kv_checks.py); exits 1 if unsound
"""

from __future__ import annotations

import json
import sys


def main(cmd: str, app: str, address: str) -> None:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    router = serve.get_deployment_handle("Router", app_name=app)
    if cmd == "stats":
        out = router.stats.remote().result()
    elif cmd == "audit":
        from tests.integration.kv_checks import assert_kv_sound

        reports = assert_kv_sound(router, idle=True, timeout_s=60)
        out = {"workers": len(reports)}
    elif cmd == "resources":
        out = ray.available_resources()
    elif cmd == "placement":
        from ray.util.state import list_actors

        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        out = {}
        for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                             limit=1000):
            name = a.name or ""
            if name.startswith(app + "-"):  # "<app>[-r<n>]-<role>-<i>" (see actors/cluster.py)
                role_index = "-".join(name.split("-")[-2:])
                out[role_index] = ips.get(a.node_id)
            elif a.class_name.startswith("ServeReplica:"):
                out[a.class_name.split(":")[-1]] = ips.get(a.node_id)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])

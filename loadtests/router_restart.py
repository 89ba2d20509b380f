"""How long a killed Router replica takes to serve again, and where the time goes (issue 27).

    PYTHONPATH=. .venv/bin/python loadtests/router_restart.py --kills 3 --out router-restart.json

Starts its own Ray cluster and the HTTP app ("tiny", 1 prefill + its attention executor,
1 decode, static offload ratio 0.5), and for each kill: SIGKILL of the Router replica's
process while the app is idle, then times (from the kill)
  - ``replica_s``: until Serve's controller has started a new Router replica actor (its
    name appears: the controller found the dead one at a health check and replaced it);
  - ``health_s``: until the ingress's /health answers 200, i.e. the new replica's
    constructor has started a whole new cluster of workers (the old ones died with the
    replica that owned them) and answers model_info; the ingress's probe asks it.
The difference is the router's own start-up: a new set of workers (processes, model
load, links) plus the policy's profiling, if any.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

APP = "restart"


def _replicas() -> dict[str, str]:
    import ray

    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#Router#")}


def _pid(name: str, namespace: str) -> int:
    import ray

    actor = ray.get_actor(name, namespace=namespace)
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import httpx
    import ray
    from ray import serve

    from adrenaline.serve.app import build_app
    from tests.integration.serve_helpers import free_port, serve_http_port

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    args = {"model": "tiny", "executor": {"enabled": True, "engine": {"kv_cache_tokens": 8192}},
            "policy": "static", "policy_options": {"ratio": 0.5}}
    t0 = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{serve_http_port()}", timeout=120)
    while http.get("/health").status_code != 200:
        time.sleep(0.2)
    rows = []
    print(f"app up after {time.monotonic() - t0:.1f} s (first start, the model built once)")
    for k in range(a.kills):
        (old, ns), = _replicas().items()
        os.kill(_pid(old, ns), signal.SIGKILL)
        t_kill = time.monotonic()
        while not any(n != old for n in _replicas()):
            time.sleep(0.05)
        replica_s = time.monotonic() - t_kill
        while http.get("/health").status_code != 200:
            time.sleep(0.1)
        health_s = time.monotonic() - t_kill
        prompt = [11, 22, 33, 44]
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                               "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        rows.append({"kill": k, "replica_s": round(replica_s, 2), "health_s": round(health_s, 2),
                     "router_start_s": round(health_s - replica_s, 2)})
        print(rows[-1], flush=True)
    summary = {key: statistics.median(r[key] for r in rows)
               for key in ("replica_s", "health_s", "router_start_s")}
    print("median:", summary)
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "median": summary}, indent=1))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

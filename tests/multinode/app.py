"""Deploying the app to a netns cluster and reaching it, for the multi-node tests and bench."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tests.multinode.netns_cluster import NodeSpec, tool

# The 3-node layout: nodes offer the custom resources the YAML's roles ask for.
HEAD = NodeSpec("head", 1, {"adrenaline_head": 100})  # the YAML pins router + ingress here
PREFILL = NodeSpec("prefill", 1, {"adrenaline_prefill": 100})
DECODE = NodeSpec("decode", 1, {"adrenaline_decode": 100})

APP = "adrenaline"
URL = "http://127.0.0.1:8000"  # the proxy, from inside the head's namespace
CONFIG = Path(__file__).resolve().parents[2] / "serve_configs" / "multinode.yaml"


def config(policy_options: dict | None = None) -> dict:
    """serve_configs/multinode.yaml as shipped (the router and ingress pinned to the
    head), with short recovery bounds."""
    cfg = yaml.safe_load(CONFIG.read_text())
    app = cfg["applications"][0]
    if policy_options is not None:
        app["args"]["policy_options"] = policy_options
    app["args"]["recovery"] = {"enabled": True, "timeout_s": 20, "retry_interval_s": 2}
    return cfg


def serve_cli(cluster, *args: str) -> str:
    r = cluster.run(cluster.head, [tool("serve"), *args, "-a", cluster.dashboard], check=False)
    assert r.returncode == 0, f"serve {args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def http_status(cluster, path: str) -> tuple[int, dict]:
    code = ("import httpx, json; r = httpx.get(%r, timeout=30); "
            "print(json.dumps([r.status_code, dict(r.headers)]))" % (URL + path))
    status, headers = json.loads(cluster.python(cluster.head, code).strip().splitlines()[-1])
    return status, headers


def deploy(cluster, cfg: dict, timeout_s: float = 240) -> None:
    """`serve deploy` the config, then wait until `serve status` says RUNNING and /health is 200."""
    path = cluster.root / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve_cli(cluster, "deploy", str(path))
    deadline = time.monotonic() + timeout_s
    while True:
        status = yaml.safe_load(serve_cli(cluster, "status"))
        app = (status.get("applications") or {}).get(APP, {})
        if app.get("status") == "RUNNING" and http_status(cluster, "/health")[0] == 200:
            return
        assert app.get("status") != "DEPLOY_FAILED", app
        assert time.monotonic() < deadline, f"not RUNNING: {app}"
        time.sleep(2)



"""Helpers the Serve-based integration tests share."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A loopback TCP port that was free when asked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_http_port() -> int:
    """The port this cluster's Serve proxy actually listens on."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_http_config.remote()).port


@contextmanager
def running_app(args: dict, name: str, audit_kv: bool = True) -> Iterator:
    """Serve ``build_app(args)`` as app ``name``; yield an httpx client once /health is 200.

    On exit: audit every actor's KV (unless ``audit_kv`` is False), then delete the app.
    """
    import httpx
    from ray import serve

    from adrenaline.serve.app import build_app
    from tests.integration.kv_checks import assert_kv_sound

    # A free port, not 8000: another Ray cluster on this machine may hold 8000. If Serve
    # already runs in this cluster (an earlier module), this is a no-op: ask for its port.
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_app(args), name=name, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_http_port()}", timeout=120) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app never became healthy"
            time.sleep(0.5)
        yield client
    if audit_kv:
        assert_kv_sound(serve.get_deployment_handle("Router", app_name=name))
    serve.delete(name)


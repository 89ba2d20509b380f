"""Helpers the Serve-based integration tests share."""

from __future__ import annotations

import socket


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

"""One local Ray cluster for the whole integration session (started on first use)."""

from __future__ import annotations

import os

import pytest

from tests.integration.serve_helpers import free_port


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # HTTP on a free port: a developer's own `serve run` may hold 8000.
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    yield ray
    serve.shutdown()
    ray.shutdown()

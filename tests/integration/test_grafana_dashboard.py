"""deploy/grafana/adrenaline.json names only series the app exports: every panel's PromQL
is parsed (tests/promql.py) and each metric it selects is in /metrics after a short load
(completions, a stream, an n-choice request, so every histogram has observations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.serve_helpers import running_app
from tests.promql import metric_names

pytest.importorskip("httpx")

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "adrenaline.json"


def _exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_every_panel_metric_is_exported(ray_cluster):
    dash = json.loads(DASHBOARD.read_text())
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}
    assert len(exprs) >= 9 and all(exprs.values())
    wanted = {title: set().union(*(metric_names(e) for e in es)) for title, es in exprs.items()}
    assert all(wanted.values()), wanted  # every panel selects something
    args = {"model": "tiny", "policy": "static", "policy_options": {"ratio": 0.5},
            "prefill": {"num_instances": 1, "engine": {"kv_cache_tokens": 2048}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 2048}},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": 2048}}}
    with running_app(args, "grafana") as client:
        for i in range(4):
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7, i],
                                                     "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "n": 2,
                                                 "max_tokens": 8, "stream": True})
        assert r.status_code == 200
        exported = _exported(client.get("/metrics").text)
    missing = {title: sorted(names - exported) for title, names in wanted.items()
               if names - exported}
    assert not missing, missing

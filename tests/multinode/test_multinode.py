"""One deployment across Ray nodes with their own addresses (see conftest.py and
netns_cluster.py): `serve deploy` of serve_configs/multinode.yaml, greedy parity with the
offline engine over HTTP, a redeploy with a changed config, and the loss of a whole node
under load (rerun elsewhere; 503 + Retry-After while nothing can be placed; back when the
node rejoins). The shipped config keeps the router on the head, so losing a worker node
never touches it; with the router deliberately on a worker node (a test-only config),
losing that node loses no stream either (the ingress resends them to the new router).
Every scenario ends with the KV audit.

The tests run in order on one cluster (module scope); each leaves it serving.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import yaml

from adrenaline import LLM, SamplingParams
from tests.multinode.app import (APP, DECODE, PREFILL, URL, config, deploy, http_status,
                                  serve_cli)
from tests.multinode.load import prompts
from tests.multinode.netns_cluster import NodeSpec


def load_cmd(n: int, seed: int, max_tokens: int, stream: bool, progress: str | None = None):
    argv = [sys.executable, "-m", "tests.multinode.load", "--url", URL, "--n", str(n),
            "--seed", str(seed), "--max-tokens", str(max_tokens)]
    return argv + (["--stream"] if stream else []) + (["--progress", progress] if progress else [])


def run_load(cluster, n: int, seed: int, max_tokens: int, stream: bool) -> dict:
    r = cluster.run(cluster.head, load_cmd(n, seed, max_tokens, stream))
    return json.loads(r.stdout.strip().splitlines()[-1])


@functools.cache
def expected_texts(n: int, seed: int, max_tokens: int) -> list[str]:
    """The offline engine's greedy texts for the prompts the load client sends."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [o.text for o in _offline().generate(prompts(n, seed), params)]


@functools.cache
def _offline() -> LLM:
    return LLM("tiny")


def assert_exact(out: dict, expected: list[str]) -> None:
    """0 lost (every request ended 200 without error), 0 changed (the offline engine's text,
    so no token was repeated or dropped on the wire)."""
    results = out["results"]
    lost = [r for r in results if r["status"] != 200 or r["error"] or r["finish_reason"] != "length"]
    assert not lost, [(r["status"], r["error"], len(r["text"])) for r in lost]
    assert [r["text"] for r in results] == expected


def test_three_nodes_greedy_parity_over_http(netns_cluster):
    """head (router, ingress, proxy); prefill + executor; decode: half the requests offloaded,
    so both the KV handoff and the per-layer attention exchange cross nodes."""
    c = netns_cluster
    deploy(c, config({"ratio": 0.5}))
    where = c.driver("placement", APP)
    assert where["prefill-0"] == where["executor-0"] == c.ip("prefill"), where
    assert where["decode-0"] == c.ip("decode"), where
    assert where["Router"] == where["Ingress"] == c.ip("head"), where
    for stream in (False, True):
        assert_exact(run_load(c, 8, 1, 12, stream), expected_texts(8, 1, 12))
    stats = c.driver("stats", APP)
    assert 0 < stats["num_offloaded"] < stats["num_placed"], stats
    # Metrics of every node's workers reach the ingress's /metrics.
    metrics = c.python(c.head, "import httpx; print(httpx.get(%r, timeout=30).text)"
                       % (URL + "/metrics"))
    for role in ("prefill", "decode", "executor"):
        assert f'adrenaline_worker_running_requests{{index="0",role="{role}"}}' in metrics
    c.driver("audit", APP)


def test_redeploy_with_changed_config(netns_cluster):
    """`serve deploy` again with every request offloaded: the app is rebuilt on the running
    cluster, the old cluster's actors and bundles are gone, outputs unchanged."""
    c = netns_cluster
    deploy(c, config({"ratio": 1.0}))
    assert yaml.safe_load(serve_cli(c, "config"))["args"]["policy_options"] == {"ratio": 1.0}
    before = c.driver("stats", APP)
    assert before["num_placed"] == 0, before  # a new router
    assert_exact(run_load(c, 6, 2, 10, True), expected_texts(6, 2, 10))
    stats = c.driver("stats", APP)
    assert stats["num_offloaded"] == stats["num_placed"] > 0, stats
    free = c.driver("resources", APP)
    # One prefill bundle and one decode worker hold a unit each: the old ones were released.
    assert free["adrenaline_prefill"] == PREFILL.resources["adrenaline_prefill"] - 1, free
    assert free["adrenaline_decode"] == DECODE.resources["adrenaline_decode"] - 1, free
    c.driver("audit", APP)


def test_node_loss_under_load_reruns_on_remaining_nodes(netns_cluster, tmp_path):
    """16 concurrent streams; the decode node is killed (raylet and every process on it)
    mid-load; a spare decode node takes over: 0 lost, 0 changed, and the stall is timed."""
    c = netns_cluster
    deploy(c, config({"ratio": 0.5}))
    c.add_node(NodeSpec("decode2", 1, dict(DECODE.resources)))
    n, seed, max_tokens = 16, 3, 160
    expected = expected_texts(n, seed, max_tokens)
    before = c.driver("stats", APP)
    progress = tmp_path / "progress"
    proc = c.popen(c.head, load_cmd(n, seed, max_tokens, True, str(progress)),
                   stdout=open(tmp_path / "out.json", "w"), stderr=open(tmp_path / "err", "w"))
    try:
        while not progress.exists() or int(progress.read_text() or 0) < 4 * n:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.05)
        victim = "decode" if c.driver("placement", APP)["decode-0"] == c.ip("decode") else "decode2"
        killed_at = time.time()
        assert c.kill_node(victim) > 0
        assert proc.wait(timeout=400) == 0, (tmp_path / "err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads((tmp_path / "out.json").read_text().strip().splitlines()[-1])
    assert_exact(out, expected)
    after = c.driver("stats", APP)
    # The same router all along (a new one would count from 0), still on the head.
    assert after["num_recoveries"] - before["num_recoveries"] == 1, after
    assert c.driver("placement", APP)["Router"] == c.ip("head")
    assert after["num_reruns"] > before["num_reruns"], after
    survivor = "decode2" if victim == "decode" else "decode"
    assert c.driver("placement", APP)["decode-0"] == c.ip(survivor)
    times = out["chunk_times"]
    # Back to serving: the first chunk after the longest gap that follows the kill.
    gaps = [(b - a, b) for a, b in zip(times, times[1:]) if b > killed_at]
    _, resumed = max(gaps)
    print(f"\nnode loss: {n} streams, decode node killed; tokens flowed again after "
          f"{resumed - killed_at:.1f} s; {after['num_reruns'] - before['num_reruns']} reruns")
    c.driver("audit", APP)
    c.start_node(victim)  # the lost node rejoins
    c.wait_nodes(4)


def test_router_on_a_lost_worker_node_loses_no_stream(netns_cluster, tmp_path):
    """A test-only layout: the Router deliberately on a decode node (the shipped config
    keeps it on the head; the ingress stays there). 16 streams; the node holding the
    router is killed, taking the router and the workers it owns. Serve starts a new
    router on the other decode node, which starts a new cluster; the ingress resends every
    stream with the tokens already sent: 0 lost, 0 changed."""
    c = netns_cluster
    cfg = config({"ratio": 0.5})
    app = cfg["applications"][0]
    app["args"]["recovery"]["timeout_s"] = 90  # node death + a new router + its cluster
    for d in app["deployments"]:
        if d["name"] == "Router":
            d["ray_actor_options"] = {"num_cpus": 0, "resources": {"adrenaline_decode": 1}}
    deploy(c, cfg)
    router_ip = c.driver("placement", APP)["Router"]
    victim = next(n for n in ("decode", "decode2") if c.ip(n) == router_ip)
    n, seed, max_tokens = 16, 5, 160
    expected = expected_texts(n, seed, max_tokens)
    progress = tmp_path / "progress"
    proc = c.popen(c.head, load_cmd(n, seed, max_tokens, True, str(progress)),
                   stdout=open(tmp_path / "out.json", "w"), stderr=open(tmp_path / "err", "w"))
    try:
        while not progress.exists() or int(progress.read_text() or 0) < 4 * n:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.05)
        killed_at = time.time()
        assert c.kill_node(victim) > 0
        assert proc.wait(timeout=400) == 0, (tmp_path / "err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads((tmp_path / "out.json").read_text().strip().splitlines()[-1])
    assert_exact(out, expected)
    survivor = "decode2" if victim == "decode" else "decode"
    assert c.driver("placement", APP)["Router"] == c.ip(survivor)
    times = out["chunk_times"]
    gaps = [(b - a, b) for a, b in zip(times, times[1:]) if b > killed_at]
    _, resumed = max(gaps)
    print(f"\nrouter's node lost: {n} streams, 0 lost; tokens flowed again after "
          f"{resumed - killed_at:.1f} s")
    c.driver("audit", APP)
    c.start_node(victim)
    c.wait_nodes(4)
    deploy(c, config({"ratio": 0.5}))  # the shipped layout again, for the tests after


def test_no_placement_503_then_back_when_node_rejoins(netns_cluster, tmp_path):
    """The only prefill node is lost: nothing can be placed, so requests get 503 with
    Retry-After at once; the node rejoins and the cluster is replaced on it. Clients that
    honor Retry-After all end with the offline engine's text."""
    c = netns_cluster
    c.kill_node("prefill")
    lost_at = time.monotonic()
    while (s := http_status(c, "/health"))[0] != 503:  # recovery gives up after timeout_s
        assert time.monotonic() - lost_at < 120, s
        time.sleep(1)
    r = c.python(c.head, "import httpx, json; r = httpx.post(%r, json={'model': 'tiny', "
                 "'prompt': [1, 2, 3], 'max_tokens': 4}, timeout=30); "
                 "print(json.dumps([r.status_code, r.headers.get('retry-after')]))"
                 % (URL + "/v1/completions"))
    status, retry_after = json.loads(r.strip().splitlines()[-1])
    assert status == 503 and retry_after is not None and int(retry_after) > 0
    n, seed, max_tokens = 8, 4, 16
    proc = c.popen(c.head, load_cmd(n, seed, max_tokens, False),
                   stdout=open(tmp_path / "out.json", "w"), stderr=open(tmp_path / "err", "w"))
    try:
        time.sleep(2)  # the clients are being refused and retrying
        rejoin_at = time.monotonic()
        c.start_node("prefill")
        assert proc.wait(timeout=300) == 0, (tmp_path / "err").read_text()
        back_s = time.monotonic() - rejoin_at
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads((tmp_path / "out.json").read_text().strip().splitlines()[-1])
    assert_exact(out, expected_texts(n, seed, max_tokens))
    assert all(r["retries_503"] >= 1 for r in out["results"]), out["results"]
    print(f"\nno placement: 503 + Retry-After {retry_after}; served again {back_s:.1f} s after "
          f"`ray start` on the lost node")
    assert c.driver("stats", APP)["state"] == "up"
    c.driver("audit", APP)

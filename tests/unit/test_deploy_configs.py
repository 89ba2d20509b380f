"""The multi-node deployment files stay valid: serve_configs/multinode.yaml and the KubeRay
RayService manifest (deploy/kuberay/rayservice.yaml) pass Serve's own config schema and the
app's (every field of `args` is one AppArgs accepts), describe the same application, and
every custom resource a role asks for is offered by some node group of the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adrenaline.config import ConfigError
from adrenaline.app_config import parse_app_args

ROOT = Path(__file__).resolve().parents[2]
MULTINODE = ROOT / "serve_configs" / "multinode.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def _serve_config(cfg: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # Serve's own fields (raises on unknown ones)
    (app,) = cfg["applications"]
    assert app["import_path"] == "adrenaline.serve.app:build_app"
    return app["args"]


def _manifest() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _start_resources(params: dict) -> dict[str, float]:
    """KubeRay's rayStartParams.resources: a quoted JSON object, as `ray start` gets it."""
    raw = params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_multinode_yaml_is_valid():
    args = parse_app_args(_serve_config(yaml.safe_load(MULTINODE.read_text())))
    assert args.prefill.resources == {"adrenaline_prefill": 1}
    assert args.decode.resources == {"adrenaline_decode": 1}
    assert args.executor.enabled


def test_rayservice_manifest_serves_the_multinode_app():
    m = _manifest()
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayService")
    args = _serve_config(yaml.safe_load(m["spec"]["serveConfigV2"]))
    parse_app_args(args)
    assert args == _serve_config(yaml.safe_load(MULTINODE.read_text()))


def test_rayservice_groups_offer_what_the_roles_ask_for():
    m = _manifest()
    cluster = m["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:
        (container, *_) = g["template"]["spec"]["containers"]
        assert container["image"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # KubeRay wants strings
    offered: dict[str, float] = {}
    for g in groups:
        for k, v in _start_resources(g["rayStartParams"]).items():
            offered[k] = max(offered.get(k, 0), v)
    args = parse_app_args(_serve_config(yaml.safe_load(m["spec"]["serveConfigV2"])))
    for role in (args.prefill, args.decode):
        for k, v in role.resources.items():
            assert offered.get(k, 0) >= v * role.num_instances, (k, offered)


def test_role_resources_are_checked():
    with pytest.raises(ConfigError, match="resources"):
        parse_app_args({"prefill": {"resources": {"CPU": 1}}})
    with pytest.raises(ConfigError, match="resources"):
        parse_app_args({"decode": {"resources": {"adrenaline_decode": 0}}})
    with pytest.raises(ConfigError, match="invalid app args"):
        parse_app_args({"decode": {"resource": {"adrenaline_decode": 1}}})  # a typo


def _pins(cfg: dict) -> dict[str, dict]:
    """Deployment name -> its ray_actor_options, as the config's application sets them."""
    (app,) = cfg["applications"]
    return {d["name"]: d["ray_actor_options"] for d in app.get("deployments", [])}


def test_router_and_ingress_are_pinned_to_the_head():
    """The router holds every stream and owns the workers: it and the ingress sit beside
    the proxy on the head, by a resource only the head offers, in both files alike."""
    m = _manifest()
    cluster = m["spec"]["rayClusterConfig"]
    head = _start_resources(cluster["headGroupSpec"]["rayStartParams"])
    workers: dict[str, float] = {}
    for g in cluster["workerGroupSpecs"]:
        workers |= _start_resources(g["rayStartParams"])
    for cfg in (yaml.safe_load(MULTINODE.read_text()), yaml.safe_load(m["spec"]["serveConfigV2"])):
        pins = _pins(cfg)
        assert set(pins) == {"Router", "Ingress"}, pins
        for name, opts in pins.items():
            assert opts["num_cpus"] == 0, (name, opts)  # the whole dict replaces the code's
            (res, amount), = opts["resources"].items()
            assert res in head and res not in workers, (name, res, head, workers)
            assert head[res] >= amount
    assert _pins(yaml.safe_load(MULTINODE.read_text())) == _pins(
        yaml.safe_load(m["spec"]["serveConfigV2"]))
    # The `ray start` line DEPLOY.md gives for the head offers it too.
    deploy_md = (ROOT / "docs" / "DEPLOY.md").read_text()
    head_line = next(line for line in deploy_md.splitlines() if line.startswith("ray start --head"))
    assert '"adrenaline_head": 100' in head_line, head_line

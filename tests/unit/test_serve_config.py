"""App args: every shipped YAML validates; bad fields fail at start, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adrenaline import ConfigError
from adrenaline.policy import make_policy
from adrenaline.policy.profile import ClusterProfile
from adrenaline.serve.config import parse_app_args

CONFIGS = sorted((Path(__file__).parents[2] / "serve_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    doc = yaml.safe_load(path.read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "adrenaline.serve.app:build_app"
    args = parse_app_args(app["args"])
    assert args.prefill.num_instances >= 1 and args.decode.num_instances >= 1
    # Any policy builds from its options (load_aware also needs a start-up profile).
    profile = ClusterProfile(step_time_s={1: 0.01}, decode_bandwidth_gbs=[1.0],
                             executor_bandwidth_gbs=[1.0], decode_capacity_tokens=[1024],
                             executor_capacity_tokens=[1024])
    make_policy(args.policy, dict(args.policy_options), profile)


@pytest.mark.parametrize("args, field", [
    ({"prefil": {}}, "prefil"),
    ({"decode": {"num_instances": 0}}, "num_instances"),
    ({"decode": {"num_instances": "two"}}, "num_instances"),
    ({"prefill": {"engine": {"block_size": 12}}}, "block_size"),
    ({"prefill": {"engine": {"kv_cache_tokns": 12}}}, "kv_cache_tokns"),
    ({"device": "tpu"}, "device"),
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"limits": {"max_ongoing_requests": 0}}, "max_ongoing_requests"),
    ({"limits": {"max_queue": 3}}, "max_queue"),
])
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        parse_app_args(args)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("random_walk")
    with pytest.raises(ConfigError, match="cannot load"):
        make_policy("no.such.module:Policy")


def test_limits_set_serve_options():
    args = parse_app_args({"limits": {"max_ongoing_requests": 10, "max_queued_requests": 4,
                                      "retry_after_s": 2}})
    assert args.limits.max_queued_requests == 4 and args.limits.retry_after_s == 2
    opts = args.serve_options
    assert opts["max_ongoing_requests"] > 10  # room for control calls beside generation
    assert opts["max_queued_requests"] == opts["max_ongoing_requests"]  # a bounded backstop


def test_recompute_request_continues_after_streamed_tokens():
    from adrenaline import SamplingParams
    from adrenaline.protocol import GenerateRequest
    from adrenaline.serve.router import recompute_request

    req = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                          params=SamplingParams(max_tokens=10, temperature=0))
    assert recompute_request(req, []) is req
    again = recompute_request(req, [7, 8, 9, 10])
    assert again.prompt_token_ids == [1, 2, 3, 7, 8, 9, 10] and again.request_id == "r"
    assert again.params.max_tokens == 6 and again.params.temperature == 0
    assert req.prompt_token_ids == [1, 2, 3]  # the original is untouched


def test_make_run_serves_the_real_model_with_offloading():
    """`make run` (local.yaml): SmolLM2, one prefill + its executor + one decode, load_aware."""
    path = Path(__file__).parents[2] / "serve_configs" / "local.yaml"
    (app,) = yaml.safe_load(path.read_text())["applications"]
    args = parse_app_args(app["args"])
    assert args.model == "smollm2-135m-instruct" and args.policy == "load_aware"
    assert args.executor.enabled
    assert args.prefill.num_instances == 1 and args.decode.num_instances == 1

"""App args: every shipped YAML validates; bad fields fail at start, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adrenaline import ConfigError
from adrenaline.policy import make_policy
from adrenaline.policy.profile import ClusterProfile
from adrenaline.app_config import parse_app_args

CONFIGS = sorted((Path(__file__).parents[2] / "serve_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    doc = yaml.safe_load(path.read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "adrenaline.serve.app:build_app"
    args = parse_app_args(app["args"])
    assert args.prefill.num_instances >= 1 and args.decode.num_instances >= 1
    # load_aware needs the cluster's start-up profile: a stand-in with one executor.
    profile = ClusterProfile({1: 0.01}, [1e-6], [1e-6], 1e-3, [1 << 14], [1 << 14], 1000)
    make_policy(args.policy, args.policy_options, profile)


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
    ({"device": "cuda", "executor": {"sm_count": 12}}, "sm_count"),
    ({"executor": {"sm_count": 64}}, "sm_count"),  # CPU has no SM partitions
])
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        parse_app_args(args)


def test_one_gpu_config_shares_one_device():
    """gpu-1gpu.yaml: prefill + executor + decode on one GPU, each with its own KV budget."""
    doc = yaml.safe_load((Path(__file__).parents[2] / "serve_configs" / "gpu-1gpu.yaml")
                         .read_text())
    args = parse_app_args(doc["applications"][0]["args"])
    assert args.device == "cuda" and args.executor.enabled
    assert args.prefill.num_instances == args.decode.num_instances == 1
    # Fractional GPUs that fit on one device (the executor takes half of the prefill's).
    assert 0 < args.prefill.num_gpus < 1 and 0 < args.decode.num_gpus < 1
    assert args.prefill.num_gpus + args.decode.num_gpus <= 1
    for engine in (args.prefill.engine, args.executor.engine, args.decode.engine):
        assert engine.kv_cache_bytes
    # NCCL cannot join two ranks on one device: this layout must not ask for it.
    assert args.transport == "gloo"
    assert args.executor.sm_count and args.executor.sm_count < 132  # an H200 has 132 SMs
    # The KV-bound case: the executor holds 3x the decode worker's requests.
    assert args.executor.engine.kv_cache_bytes == 3 * args.decode.engine.kv_cache_bytes


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
    # The ingress takes far more than the generation limits: its own gate answers 429.
    ing = args.ingress_serve_options
    assert ing["max_ongoing_requests"] == args.limits.max_http_requests >= 100 * 10
    with pytest.raises(ConfigError, match="max_http_requests"):
        parse_app_args({"limits": {"max_ongoing_requests": 100, "max_http_requests": 120}})


def test_api_keys_never_in_repr():
    args = parse_app_args({"api_keys": ["sk-secret-1", "sk-secret-2"]})
    assert args.api_keys == ["sk-secret-1", "sk-secret-2"]
    assert "sk-secret" not in repr(args) and "sk-secret" not in str(args)
    assert "2 hidden" in repr(args)


def test_recompute_request_continues_after_streamed_tokens():
    from adrenaline import SamplingParams
    from adrenaline.protocol import GenerateRequest
    from adrenaline.serve.recovery import recompute_request

    req = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                          params=SamplingParams(max_tokens=10, temperature=0))
    assert recompute_request(req, []) is req
    again = recompute_request(req, [7, 8, 9, 10])
    # The streamed tokens stay output: max_tokens, min_tokens, penalties and grammar see them.
    assert again.prompt_token_ids == [1, 2, 3] and again.request_id == "r"
    assert again.output_token_ids == [7, 8, 9, 10] and again.params == req.params
    assert recompute_request(again, [11]).output_token_ids == [7, 8, 9, 10, 11]
    assert req.output_token_ids == []  # the original is untouched


def test_make_run_serves_the_real_model_with_offloading():
    """`make run` (local.yaml): SmolLM2, one prefill + its executor + one decode, load_aware."""
    path = Path(__file__).parents[2] / "serve_configs" / "local.yaml"
    (app,) = yaml.safe_load(path.read_text())["applications"]
    args = parse_app_args(app["args"])
    assert args.model == "smollm2-135m-instruct" and args.policy == "load_aware"
    assert args.executor.enabled
    assert args.prefill.num_instances == 1 and args.decode.num_instances == 1


def test_prefill_gate_is_off_by_default_on_in_local_yaml_and_in_the_offload_bench_flag():
    import argparse

    from adrenaline.bench.offload_bench import app_args

    assert not parse_app_args({}).limits.prefill_when_admissible
    local = next(p for p in CONFIGS if p.name == "local.yaml")
    (app,) = yaml.safe_load(local.read_text())["applications"]
    assert parse_app_args(app["args"]).limits.prefill_when_admissible
    for on in (False, True):
        ns = argparse.Namespace(model="tiny", dtype="float32", static_ratio=0.75,
                                tpot_slo_ms=250.0, max_num_seqs=8, pin=False,
                                prefill_kv_tokens=1024, decode_kv_tokens=512, decode_threads=1,
                                executor_kv_tokens=1024, prefill_when_admissible=on,
                                nice=-5 if on else None, block_size=64 if on else 16,
                                step_feedback=on, pace_layers=on, hide_remote=not on)
        parsed = parse_app_args(app_args(ns, "load_aware"))
        assert parsed.policy_options["step_feedback"] is on  # --no-step-feedback: off
        assert parsed.executor.pace_layers is on  # --no-pace-layers: off
        assert parsed.policy_options["hide_remote"] is (not on)  # --no-hide-remote: off
        assert parsed.limits.prefill_when_admissible is on
        assert parsed.decode.nice == parsed.prefill.nice == (-5 if on else None)
        assert (parsed.prefill.engine.block_size == parsed.decode.engine.block_size
                == parsed.executor.engine.block_size == (64 if on else 16))

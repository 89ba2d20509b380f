"""Cluster simulator: real policies and schedulers, cost model fitted to this project's runs."""

from __future__ import annotations

import json
import math

import pytest

from adrenaline.sim.fit import DOCS, check_cpu, fit_h200
from adrenaline.sim.hardware import get_profile, load_profiles
from adrenaline.sim.models import load_model
from adrenaline.sim.results import summarize
from adrenaline.sim.simulator import SimConfig, Simulation
from adrenaline.sim.workload import SimArrival, Workload, arrivals

# A KV-bound 1P1D on this CPU: the decode pool holds 8 of the 48 requests at a time.
BOUND = dict(model="small", hardware="cpu", prefill_kv_tokens=8192, decode_kv_tokens=1536,
             executor_kv_tokens=8192, max_num_seqs=48, sample_interval_s=0.5)
BURST = Workload(num_prompts=48, input_len=128, output_len=64)


def _run(**kw) -> tuple[Simulation, dict]:
    sim = Simulation(SimConfig(**{**BOUND, **kw})).run(arrivals(BURST))
    return sim, summarize(sim)


def test_policy_change_changes_the_simulated_outcome():
    _, none = _run(policy="none")
    _, static = _run(policy="static", policy_options={"ratio": 0.75}, executor=True)
    assert none["offload_ratio"] == 0.0
    assert static["offload_ratio"] == pytest.approx(0.75)  # StaticRatio's own counter
    # Offloading lifts the batch past what the decode pool holds (8 x 192 tokens).
    assert none["mean_decode_batch"] <= 8.0 < static["mean_decode_batch"]
    assert static["metrics"]["output_throughput"] != none["metrics"]["output_throughput"]
    # load_aware's bound comes from the simulated start-up profile, like the live one. With
    # a fast exchange it offloads part of the burst; with an exchange slower than these short
    # contexts' local attention it cannot hide remote attention, so it offloads nothing.
    sim, aware = _run(policy="load_aware", policy_options={"tpot_slo_ms": 250}, executor=True,
                      exchange_layer_s=0.0)
    assert aware["b_max"] == sim.policy.b_max and 0.0 < aware["offload_ratio"] < 1.0
    _, slow = _run(policy="load_aware", policy_options={"tpot_slo_ms": 250}, executor=True,
                   exchange_layer_s=0.005)
    assert slow["offload_ratio"] == 0.0


def test_a_user_policy_by_import_path_runs(tmp_path, monkeypatch):
    (tmp_path / "mypolicy.py").write_text(
        "from adrenaline.policy import Placement, PlacementPolicy\n"
        "class AlwaysOffload(PlacementPolicy):\n"
        "    def place(self, req, load):\n"
        "        return Placement(prefill=0, decode=0, offload=True)\n"
        "    def admit(self, req, where, load):\n"
        "        return where if load.executor_fits(0, self.request_tokens(req)) else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, r = _run(policy="mypolicy:AlwaysOffload", executor=True)
    assert r["offload_ratio"] == 1.0 and r["num_unfinished"] == 0


def test_every_block_and_counter_is_released_at_the_end():
    sim, r = _run(policy="static", policy_options={"ratio": 0.5}, executor=True, num_prefill=2,
                  num_decode=2)
    assert r["metrics"]["completed"] == 48 and r["metrics"]["total_output_tokens"] == 48 * 64
    for inst in sim.prefill + sim.decode + sim.executors:
        inst.bm.check_invariants()
        assert inst.bm.num_used_blocks == 0
    load = sim.router.load
    assert not any(load.prefill_inflight + load.decode_active + load.decode_reserved_tokens
                   + load.decode_pending_tokens + load.executor_reserved_tokens
                   + load.decode_mean_tokens + load.executor_mean_tokens)


def test_decode_preempts_with_the_real_scheduler():
    # A user policy that admits regardless of room: the decode pool overflows mid-run and
    # the real Scheduler preempts (and recomputes) its newest requests.
    sim, r = _run(policy="tests.unit.test_sim:AdmitAll")
    assert r["num_preemptions"] > 0 and r["metrics"]["completed"] == 48


from adrenaline.policy import Placement, PlacementPolicy  # noqa: E402


class AdmitAll(PlacementPolicy):
    def place(self, req, load):
        return Placement(prefill=0, decode=0)

    def admit(self, req, where, load):
        return where


# Allowed error per checked field. The scheduling outcome (mean batch) is deterministic;
# the timing fields carry this machine's run-to-run noise: the fitting run and the checking
# run prefilled the same 48 x 128 tokens in 9.3 s and 7.0 s (docs/SIMULATION.md).
CPU_TOLERANCE = {"mean_decode_batch": 0.05, "tpot_p50_ms": 0.15, "output_tok_s": 0.20}


def test_fitted_cpu_profile_checks_against_live_offload_runs():
    """The CI validation case: bench offload rows, never used by the fit."""
    hw = get_profile("cpu")
    assert "bench-offload.json" not in json.dumps(hw.fitted_on["files"])
    chk = check_cpu(hw, DOCS / "bench-offload.json", DOCS / "bench-serving-sweep.json")
    # That live run (2026-11-27, gloo) predates load_aware's hiding rule (policy/load_aware.py
    # rule d), so its load_aware row no longer describes this policy: none and static do.
    for row in (r for r in chk["offload"]["rows"] if r["system"] != "load_aware"):
        for key, tol in CPU_TOLERANCE.items():
            assert abs(row[key]["err"]) <= tol, (row["system"], key, row[key])


def test_h200_fit_checks_on_batches_it_was_not_fitted_on():
    hw = fit_h200(DOCS / "gpu-check.json")
    checked = hw.fitted_on["check_error"]
    assert set(checked) == {8, 32}
    assert all(abs(e) <= 0.10 for e in checked.values()), checked
    # The stored profile is this fit (profiles.json is regenerated by `sim fit`).
    assert load_profiles()["h200"].layer_overhead_s == pytest.approx(hw.layer_overhead_s)


def test_spec_sheet_profiles_take_the_h200_efficiencies():
    h200, a100 = get_profile("h200"), get_profile("a100-80gb")
    assert a100.eff_attn == h200.eff_attn and a100.mem_bw_gbs == 2039.0
    assert get_profile("h100").fitted_on["derived_from"] == "h200"
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("tpu")


def test_models_builtin_and_from_an_hf_config(tmp_path):
    assert load_model("llama2-7b").params == pytest.approx(6.74e9, rel=0.01)
    assert load_model("llama2-13b").params == pytest.approx(13.0e9, rel=0.01)
    assert load_model("llama3-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 100, "max_position_embeddings": 256, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    assert m.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="neither"):
        load_model(str(tmp_path / "missing"))


def test_trace_and_concurrency_cap(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i * 0.5, "prompt_len": 32 + i,
                                         "output_len": 8}) + "\n" for i in range(6)))
    got = arrivals(Workload(dataset="trace", dataset_path=str(trace)))
    assert [a.arrival_s for a in got] == [i * 0.5 for i in range(6)]
    sim = Simulation(SimConfig(model="tiny", sample_interval_s=0)).run(
        [SimArrival(0.0, 16, 4)] * 5, max_concurrency=1)
    spans = sorted((r.arrival_s, r.end_s) for r in sim.requests)
    assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))  # one at a time


def test_cli_run_sweep_and_plan(tmp_path, capsys):
    from adrenaline.app_config import parse_app_args
    from adrenaline.sim.__main__ import main

    out = tmp_path / "r.json"
    main(["run", "--model", "llama2-7b", "--hardware", "a100-80gb", "--layout", "1P1D",
          "--systems", "none,load_aware@tpot_slo_ms=100", "--dataset", "sharegpt-synthetic",
          "--num-prompts", "200", "--request-rate", "8", "--slo-tpot-ms", "100",
          "--out", str(out), "--plot-dir", str(tmp_path)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["none", "load_aware@tpot_slo_ms=100"]
    assert all(r["metrics"]["completed"] == 200 for r in rows)
    assert (tmp_path / "sim_over_time.png").is_file()
    assert "TPOT50" in capsys.readouterr().out
    result = main(["plan", "--model", "llama2-7b", "--hardware", "h100", "--num-gpus", "3",
                   "--systems", "none", "--num-prompts", "100", "--request-rate", "4",
                   "--dataset", "sharegpt-synthetic", "--slo-tpot-ms", "100"])
    assert result["best"]["layout"] in ("1P2D", "2P1D")
    args = parse_app_args(result["app_args"])  # a deployable config
    assert args.prefill.num_instances + args.decode.num_instances == 3
    with pytest.raises(SystemExit):
        main(["run", "--layout", "2X2", "--num-prompts", "1"])


def test_cli_sweep_over_layouts_and_executor_budgets_with_a_sharegpt_file(tmp_path):
    from adrenaline.sim.__main__ import main

    convs = [{"conversations": [{"from": "human", "value": "q" * (40 + 8 * i)},
                                {"from": "gpt", "value": "a" * (60 + 4 * i)}]} for i in range(30)]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(convs))
    result = main(["sweep", "--model", "llama3-8b", "--hardware", "h200", "--layout", "1P1D,2P1D",
                   "--systems", "static@ratio=0.5", "--executor-kv-tokens", "2000,50000",
                   "--dataset", "sharegpt", "--dataset-path", str(data), "--num-prompts", "30",
                   "--request-rate", "5,inf", "--sample-interval", "0"])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {r["layout"] for r in rows} == {"1P1D", "2P1D"}
    assert {r["kv_budgets_tokens"]["executor"] for r in rows} == {2000, 50000}
    # ~4 characters a token without a tokenizer: prompts of 10 + 2i tokens.
    assert all(r["metrics"]["total_input_tokens"] == sum(10 + 2 * i for i in range(30))
               for r in rows)


def test_large_run_is_fast_enough():
    """Throughput of the simulator itself: a 2P2D run of 5,000 requests in seconds."""
    import time

    cfg = SimConfig(model="llama2-7b", hardware="a100-80gb", num_prefill=2, num_decode=2,
                    sample_interval_s=1.0)
    w = Workload(dataset="sharegpt-synthetic", num_prompts=5000, request_rate=40.0)
    t0 = time.perf_counter()
    r = summarize(Simulation(cfg).run(arrivals(w)))
    assert r["metrics"]["completed"] == 5000
    assert time.perf_counter() - t0 < 30
    assert not math.isnan(r["metrics"]["tpot_p50_ms"])


def test_pinned_cpu_profile_is_the_fit_of_its_run_and_checks_on_another():
    """cpu-pinned comes from one pinned run's start-up profile (and its TTFT); the
    decode-heavy run it is checked on was never used by the fit."""
    from adrenaline.sim.fit import PINNED_ATTENTION_FILE, PINNED_CHECK_FILE, PINNED_FIT_FILE
    from adrenaline.sim.fit_pinned import check_cpu_pinned, fit_cpu_pinned

    hw = fit_cpu_pinned(DOCS / PINNED_FIT_FILE, DOCS / "bench-roofline.json",
                        attention_file=DOCS / PINNED_ATTENTION_FILE)
    stored = get_profile("cpu-pinned")
    assert stored.fitted_on["files"][0] == PINNED_FIT_FILE
    assert stored.fitted_on["files"][2] == PINNED_ATTENTION_FILE
    assert PINNED_CHECK_FILE not in stored.fitted_on["files"]
    assert stored.eff_attn == pytest.approx(hw.eff_attn)
    assert stored.eff_flops_prefill == pytest.approx(hw.eff_flops_prefill)
    assert hw.cores == 0  # pinned roles: each on a core of its own
    rows = {r["system"]: r for r in check_cpu_pinned(hw, DOCS / PINNED_CHECK_FILE)}
    assert set(rows) == {"none", "load_aware"}
    # Output tok/s, TPOT p50 and the mean decode batch within 15% of the live run's (the
    # target of docs/SIMULATION.md), for both systems.
    for row in rows.values():
        for key in ("output_tok_s", "tpot_p50_ms", "mean_decode_batch"):
            assert abs(row[key]["err"]) <= 0.15, (key, row)
    assert rows["load_aware"]["offload_ratio"]["sim"] > 0


def test_pinned_served_profile_is_the_fit_of_its_files_and_holds_its_run():
    """cpu-pinned-served takes every rate from one run's start-up profile (attention timed
    as served) and the prefill speed from another run's TTFT; it predicts that profile's
    own run within 15% (a run whose throughput, TPOT and batch no fit used)."""
    from adrenaline.sim.fit import PINNED_FIT_FILE, SERVED_PROFILE_FILE
    from adrenaline.sim.fit_pinned import check_cpu_pinned, fit_cpu_pinned_served

    hw = fit_cpu_pinned_served(DOCS / SERVED_PROFILE_FILE, DOCS / PINNED_FIT_FILE,
                               DOCS / "bench-roofline.json")
    stored = get_profile("cpu-pinned-served")
    assert stored.fitted_on["files"][:2] == [SERVED_PROFILE_FILE, PINNED_FIT_FILE]
    assert stored.eff_attn == pytest.approx(hw.eff_attn)
    assert stored.eff_flops_prefill == pytest.approx(hw.eff_flops_prefill)
    assert hw.profiled_attention_ratio == 1.0  # the policy reads the rates steps pay
    rows = {r["system"]: r for r in check_cpu_pinned(hw, DOCS / SERVED_PROFILE_FILE)}
    assert set(rows) == {"none", "load_aware"}
    for row in rows.values():
        for key in ("output_tok_s", "tpot_p50_ms", "mean_decode_batch"):
            assert abs(row[key]["err"]) <= 0.15, (key, row)


@pytest.mark.parametrize("policy", [dict(policy="none"),
                                    dict(policy="load_aware", executor=True,
                                         policy_options={"tpot_slo_ms": 250},
                                         exchange_layer_s=0.0)])
def test_prefill_gate_moves_the_wait_from_tpot_into_ttft(policy):
    """At a saturating rate (the decode pool holds 8 of these requests at a time), without
    the gate requests park after their first token and that wait lands in their TPOT;
    with ``prefill_when_admissible`` they wait before prefill instead: none parks, TPOT is
    the decode pacing alone, and TTFT absorbs the wait."""
    w = Workload(num_prompts=96, input_len=128, output_len=64, request_rate=16.0)

    def run(on: bool):
        sim = Simulation(SimConfig(**{**BOUND, **policy}, prefill_when_admissible=on))
        sim.run(arrivals(w))
        rs = sim.requests
        assert len(rs) == 96 and all(r.end_s is not None and r.n_out == 64 for r in rs)
        park = [r.admitted_s - r.first_token_s for r in rs]
        tpot = [(r.end_s - r.first_token_s) / (r.n_out - 1) for r in rs]
        pace = [(r.end_s - r.admitted_s) / (r.n_out - 1) for r in rs]  # decode alone
        ttft = [r.first_token_s - r.arrival_s for r in rs]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        load = sim.router.load
        assert not any(load.decode_active + load.decode_reserved_tokens
                       + load.decode_pending_tokens + load.executor_reserved_tokens)
        return (max(park), mean(park), mean(tpot), max(tpot), max(pace), mean(ttft),
                summarize(sim)["metrics"]["output_throughput"])

    off, on = run(False), run(True)
    # Off: requests park after their first token, and it shows in TPOT.
    assert off[1] > 2.0 and off[2] > 1.5 * off[4]
    # On: nothing parks (the gate counted the gated-through ones, so no burst got past it),
    # TPOT is the decode pacing, and it is well below the gateless TPOT.
    assert on[0] == 0.0 and on[3] == pytest.approx(on[4])
    assert on[2] < 0.6 * off[2]
    assert on[5] > off[5]  # the wait moved into TTFT
    assert on[6] == pytest.approx(off[6], rel=0.15)  # the same work, at about the same rate


def test_the_exchange_is_hidden_behind_local_attention_or_paid_on_top():
    """cost.py: with ``exchange_hidden`` an offloaded step costs what a local one does while
    the executor's round trip and attention fit behind local attention; without it the
    round trip is paid on top (only the executor's attention overlaps)."""
    from dataclasses import replace

    from adrenaline.sim.cost import CostModel

    base = replace(get_profile("cpu-pinned"), exchange_layer_s=1e-4)
    hidden = CostModel(load_model("small"), replace(base, exchange_hidden=True), 1.0)
    paid = CostModel(load_model("small"), replace(base, exchange_hidden=False), 1.0)
    local = hidden.decode_s(8, 8000)
    assert hidden.decode_s(8, 8000, 1, 100) == pytest.approx(local)
    assert hidden.remote_wait_s(8000, 1, 100) == 0.0
    assert paid.decode_s(8, 8000, 1, 100) == pytest.approx(local + paid.exchange_s)
    assert paid.remote_wait_s(8000, 1, 100) == pytest.approx(paid.exchange_s)
    # Nothing local to hide behind: both wait for the round trip and the attention.
    alone = paid.exchange_s + 100 * paid.exec_kv_tok_s
    assert hidden.remote_wait_s(0, 1, 100) == pytest.approx(alone)
    assert paid.remote_wait_s(0, 1, 100) == pytest.approx(alone)


def test_kernel_profile_is_the_fit_of_run_1_and_holds_run_3():
    """cpu-pinned-kernel takes every rate from the CPU decode kernel's run 1's start-up
    profile (the prefill speed from the pinned fitting run's TTFT, the exchange's form from
    run 1's measured wait); run 3, whose throughput, TPOT and batch no fit used, is
    predicted within 15% for both systems (docs/SIMULATION.md)."""
    from adrenaline.sim.fit import KERNEL_CHECK_FILE, KERNEL_PROFILE_FILE, PINNED_FIT_FILE
    from adrenaline.sim.fit_pinned import CHECK_KEYS, check_cpu_pinned, fit_cpu_pinned_kernel

    hw = fit_cpu_pinned_kernel(DOCS / KERNEL_PROFILE_FILE, DOCS / PINNED_FIT_FILE,
                               DOCS / "bench-roofline.json")
    stored = get_profile("cpu-pinned-kernel")
    assert stored.fitted_on["files"][:2] == [KERNEL_PROFILE_FILE, PINNED_FIT_FILE]
    assert KERNEL_CHECK_FILE not in stored.fitted_on["files"]
    assert stored.eff_attn == pytest.approx(hw.eff_attn)
    assert stored.eff_flops_prefill == pytest.approx(hw.eff_flops_prefill)
    assert stored.exchange_hidden == hw.exchange_hidden
    # Run 1 waited 0.60 ms per offloaded layer: nearer the round trip paid on top (0.42
    # simulated) than hidden (0.23).
    assert not hw.exchange_hidden and hw.profiled_attention_ratio == 1.0
    rows = {r["system"]: r for r in check_cpu_pinned(hw, DOCS / KERNEL_CHECK_FILE)}
    assert set(rows) == {"none", "load_aware"}
    for row in rows.values():
        for key in CHECK_KEYS:
            assert abs(row[key]["err"]) <= 0.15, (key, row)
    assert rows["load_aware"]["offload_ratio"]["sim"] > 0


def test_prefetch_profile_is_the_fit_of_its_first_run_and_holds_the_paced_run():
    """cpu-pinned-prefetch is fitted on the prefetching kernel's first run (niceness -5, the
    executor polling between layers), its decode cost per offloaded request included; the
    run at niceness -20 with the executor napping between layers, which no fit used, is
    predicted within 15% for both systems (docs/SIMULATION.md)."""
    from adrenaline.sim.fit import PINNED_FIT_FILE, PREFETCH_CHECK_FILE, PREFETCH_PROFILE_FILE
    from adrenaline.sim.fit_pinned import CHECK_KEYS, check_cpu_pinned, fit_cpu_pinned_kernel

    hw = fit_cpu_pinned_kernel(DOCS / PREFETCH_PROFILE_FILE, DOCS / PINNED_FIT_FILE,
                               DOCS / "bench-roofline.json", name="cpu-pinned-prefetch",
                               fit_offload_overhead=True)
    stored = get_profile("cpu-pinned-prefetch")
    assert stored.fitted_on["files"][:2] == [PREFETCH_PROFILE_FILE, PINNED_FIT_FILE]
    assert PREFETCH_CHECK_FILE not in stored.fitted_on["files"]
    assert stored.offload_seq_overhead_s == pytest.approx(hw.offload_seq_overhead_s)
    assert stored.eff_attn == pytest.approx(hw.eff_attn)
    # The fitted run's load_aware step comes out as live, and needs the per-request term.
    assert abs(hw.fitted_on["fit_error"]["load_aware"]["decode_step_ms"]) < 0.01
    assert hw.offload_seq_overhead_s > 1e-3
    rows = {r["system"]: r for r in check_cpu_pinned(hw, DOCS / PREFETCH_CHECK_FILE)}
    assert set(rows) == {"none", "load_aware"}
    for row in rows.values():
        for key in CHECK_KEYS:
            assert abs(row[key]["err"]) <= 0.15, (key, row)


def test_cost_of_offloaded_requests_counts_every_executors_requests():
    from dataclasses import replace

    from adrenaline.sim.cost import CostModel

    hw = replace(get_profile("cpu-pinned"), offload_seq_overhead_s=1e-3)
    cost = CostModel(load_model("small"), hw, 1.0)
    plain = CostModel(load_model("small"), replace(hw, offload_seq_overhead_s=0.0), 1.0)
    assert cost.decode_s(8, 8000) == pytest.approx(plain.decode_s(8, 8000))
    assert cost.decode_s(8, 8000, 2, 100) == pytest.approx(plain.decode_s(8, 8000, 2, 100) + 2e-3)
    assert cost.decode_s(8, 8000, 2, 100, all_offloaded=5) == pytest.approx(
        plain.decode_s(8, 8000, 2, 100) + 5e-3)


def test_cli_validate_checks_a_profile_on_any_offload_run(tmp_path, capsys):
    """`sim validate --profile P --check F`: the workload comes from F (here run 3 cut to
    8 requests at 2 req/s); a file whose rows disagree with its workload is refused."""
    from adrenaline.sim.__main__ import main
    from adrenaline.sim.fit import KERNEL_CHECK_FILE

    run = json.loads((DOCS / KERNEL_CHECK_FILE).read_text())
    run["workload"]["num_requests"] = 8
    for row in run["rows"]:
        row.update(rate=2.0, num_requests=8)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(run))
    result = main(["validate", "--profile", "cpu-pinned-kernel", "--check", str(short)])
    rows = result["checks"][0]["rows"]
    assert [r["system"] for r in rows] == ["none", "load_aware"]
    assert "short.json" in capsys.readouterr().out
    for row in run["rows"]:
        row["num_requests"] = 64
    short.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="8 simulated requests finished of 64"):
        main(["validate", "--check", str(short)])
    with pytest.raises(SystemExit, match="--check"):
        main(["validate", "--profile", "cpu-pinned-kernel"])

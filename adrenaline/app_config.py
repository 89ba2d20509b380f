"""The app's arguments (the `args:` of a `serve run` YAML), validated with msgspec.

A bad field fails at start with a message naming it (``ConfigError``).
"""

from __future__ import annotations

import msgspec

from adrenaline.config import ConfigError, EngineConfig


class RoleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Instances of one role (prefill or decode) and the engine each runs."""

    num_instances: int = 1
    num_cpus: float = 0.0  # Ray CPU resource per actor (0: schedule by thread budget only)
    num_gpus: float = 0.0  # Ray GPU resource per actor (1 on GPU layouts)
    # Ray custom resources per instance: instances go only to nodes that offer them (on
    # several nodes: e.g. {adrenaline_prefill: 1} on nodes started with that resource).
    resources: dict[str, float] = {}
    # The cores this role's processes run on (os.sched_setaffinity; torch threads default to
    # one per core). An executor runs on its prefill instance's set. None: unpinned.
    cpus: list[int] | None = None
    # The scheduling niceness of this role's processes (-20..19, lower runs first; an
    # executor takes its prefill instance's). On CPU, a negative value keeps the roles that
    # stand for devices ahead of the serving processes (router, proxy, Ray's own) on their
    # cores. Below 0 needs CAP_SYS_NICE; without it, a warning and the niceness unchanged.
    # None: unchanged.
    nice: int | None = None
    engine: EngineConfig = EngineConfig()

    def __post_init__(self) -> None:
        if self.nice is not None and not -20 <= self.nice <= 19:
            raise ConfigError(f"nice: must be in -20..19, got {self.nice}")
        if self.cpus is not None and (not self.cpus or min(self.cpus) < 0
                                      or len(set(self.cpus)) != len(self.cpus)):
            raise ConfigError(f"cpus: must be a non-empty list of distinct core ids >= 0, "
                              f"got {self.cpus}")
        if self.num_instances < 1:
            raise ConfigError("num_instances: must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus/num_gpus: must be >= 0")
        if any(k in ("CPU", "GPU", "memory") or v <= 0 for k, v in self.resources.items()):
            raise ConfigError("resources: custom resources only (not CPU/GPU/memory), "
                              "each amount > 0")


class ExecutorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The attention executor colocated with each prefill instance (one per prefill).

    ``engine.kv_cache_tokens``/``kv_cache_bytes`` is the memory carved from what the
    prefill instance does not need; ``engine.num_threads`` its share of the cores.
    """

    enabled: bool = False
    engine: EngineConfig = EngineConfig(kv_cache_tokens=16384)
    # CUDA only: the SMs the executor's kernels may use (a green-context partition, so the
    # prefill worker on the same GPU keeps the rest); None: the whole device. The executor
    # actor runs its service threads on that partition's stream (actors/
    # attention_executor.py). Hopper partitions come in groups of 8 SMs.
    sm_count: int | None = None
    # CPU executors: between a decode step's layers the executor naps through most of the
    # expected gap before it polls for the next layer's q, k, v (engine/layer_pacer.py),
    # leaving its core to the prefill worker and the serving path; false: it polls the
    # whole gap. A CUDA executor always polls.
    pace_layers: bool = True

    def __post_init__(self) -> None:
        if self.sm_count is not None and (self.sm_count < 8 or self.sm_count % 8):
            raise ConfigError(f"executor.sm_count: must be a multiple of 8 (>= 8), "
                              f"got {self.sm_count}")


# Serve slots beyond the generation limit, for control calls (health, metrics, abort, checks).
CONTROL_SLOTS = 64
ROUTER_HEALTH_CHECK_PERIOD_S = 2.0  # Serve's default (10 s) delays a lost router's successor


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admission limits: beyond them a request is refused at once (HTTP 429 + Retry-After).

    Invariant: the router never holds more than ``max_ongoing_requests`` generation
    requests, of which at most ``max_queued_requests`` are not yet decoding (in
    prefill or waiting for admission), so every queue in the system is bounded.
    Serve's own ``max_ongoing_requests`` on the deployments is set from these
    (plus room for control calls), and its handle queue is bounded the same way.

    ``prefill_when_admissible`` (default false): prefill only what decode can take. A
    request then waits before its prefill (still WAITING, in arrival order, so the wait
    counts in its TTFT) until the policy would admit it to decode right after prefill,
    the requests gated through and not yet admitted counted as admitted
    (policy/prefill_gate.py). Off, it is prefilled at once and waits PARKED after its
    first token, which at a saturating rate puts the wait into its TPOT. Either way a
    prefilled request the policy refuses parks (the fallback). Choices of an n-choice
    request share one prefill and skip the gate.
    """

    max_ongoing_requests: int = 512
    max_queued_requests: int = 256
    retry_after_s: int = 1  # the Retry-After a refused client gets
    max_request_bytes: int = 4 << 20  # HTTP body size; larger bodies get 413
    # HTTP requests the ingress accepts at once (Serve's own limit and queue in front of
    # it): a backstop far above the generation limits, so that the ingress itself answers
    # a burst's surplus with 429 (serve/gate.py) instead of Serve answering 503.
    max_http_requests: int = 8192
    # Prompts in one /v1/completions request (a list of strings or of token-id lists);
    # more: 400 naming this limit. Each prompt counts as one request against the limits above.
    max_prompts_per_request: int = 64
    prefill_when_admissible: bool = False  # wait before prefill for decode room (above)

    def __post_init__(self) -> None:
        if self.max_ongoing_requests < 1 or self.max_queued_requests < 1:
            raise ConfigError("limits: max_ongoing_requests and max_queued_requests must be >= 1")
        if self.max_http_requests < self.max_ongoing_requests + CONTROL_SLOTS:
            raise ConfigError(f"limits.max_http_requests: must be >= max_ongoing_requests + "
                              f"{CONTROL_SLOTS}")
        if self.max_prompts_per_request < 1:
            raise ConfigError("limits.max_prompts_per_request: must be >= 1")
        if self.retry_after_s < 0:
            raise ConfigError("limits.retry_after_s: must be >= 0")
        if self.max_request_bytes < 1024:
            raise ConfigError("limits.max_request_bytes: must be >= 1024")

    def refusal(self, num_ongoing: int, num_queued: int) -> str | None:
        """Why one more request is refused with ``num_ongoing`` held and ``num_queued`` of
        them not yet decoding (None: admitted). The router and the simulator both ask."""
        if num_ongoing >= self.max_ongoing_requests:
            return f"{num_ongoing} requests in flight (limit {self.max_ongoing_requests})"
        if num_queued >= self.max_queued_requests:
            return f"{num_queued} requests queued (limit {self.max_queued_requests})"
        return None


class RecoveryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Replacing the cluster when an actor dies (see serve/supervisor.py).

    ``timeout_s`` bounds the recovery: replacements are tried (callers wait) until it
    has passed since the loss; then the affected requests end with an error (HTTP 503)
    and new ones are refused at once (503 + Retry-After) while the router tries again
    every ``retry_interval_s`` (e.g. until a lost node rejoins).

    ``hang_timeout_s``: a worker that has work (decode: running requests; prefill: queued
    prompts) and completes no step for that long, an executor that keeps a decode step
    waiting that long, or any worker that does not answer the heartbeat for that long,
    is treated as dead: killed and
    recovered like a death. It must exceed the longest step (a first step that compiles).

    ``partial``: replace only the lost actor (its peers keep their links, KV and work; only
    requests that depended on it rerun). Several actors lost at once, or a replacement
    that cannot be started, fall back to replacing the whole cluster (``partial: false``
    always does that: every request in flight reruns).
    """

    enabled: bool = True
    partial: bool = True
    timeout_s: float = 120.0
    retry_interval_s: float = 10.0
    hang_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retry_interval_s <= 0 or self.hang_timeout_s <= 0:
            raise ConfigError("recovery: timeout_s, retry_interval_s and hang_timeout_s "
                              "must be > 0")


class AppArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything `build_app` needs. See serve_configs/local.yaml for a commented example."""

    model: str = "tiny"  # built-in name or local HF directory
    dtype: str = "auto"
    device: str = "cpu"  # "cpu" | "cuda"
    served_model_name: str | None = None  # the name clients use; defaults to `model`
    prefill: RoleConfig = RoleConfig()
    decode: RoleConfig = RoleConfig()
    executor: ExecutorConfig = ExecutorConfig()
    policy: str = "least_loaded"  # placement policy, by name or "module:Class"
    # Options of the policy (e.g. {"ratio": 0.5} for static, {"tpot_slo_ms": 100} for load_aware;
    # any policy: {"prefix_placement": false}, {"prefix_balance": 1.0}, see policy/prefix.py).
    policy_options: dict[str, bool | float] = {}
    # Per link: "auto" picks shm between two actors on one Ray node, gloo across nodes,
    # NCCL between GPUs (device: cuda); a name forces that kind on every link.
    transport: str = "auto"  # "auto" | "shm" | "gloo" | "nccl"
    limits: LimitsConfig = LimitsConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    # API keys (serve/auth.py): with any configured here or in the environment variable
    # ADRENALINE_API_KEYS, every API route needs "Authorization: Bearer <key>" (else 401);
    # /health and /metrics too unless open_health_metrics. Never logged (see __repr__).
    api_keys: list[str] = []
    open_health_metrics: bool = True

    def __repr__(self) -> str:
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["api_keys"] = f"<{len(self.api_keys)} hidden>"
        return "AppArgs(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not cpu or cuda")
        if self.transport not in ("auto", "shm", "gloo", "nccl"):
            raise ConfigError(f"transport: {self.transport!r} is not auto, shm, gloo or nccl")
        if self.executor.sm_count is not None and self.device != "cuda":
            raise ConfigError("executor.sm_count: only with device: cuda")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def serve_options(self) -> dict:
        """The router's Serve deployment options, matching the limits."""
        # Serve's handle queue is only a backstop: the ingress sends at most
        # max_ongoing_requests generation calls (serve/gate.py) plus control calls.
        n = self.limits.max_ongoing_requests + CONTROL_SLOTS
        # Serve finds a dead replica at its next health check: a short period lets a
        # killed router's successor start within seconds (the ingress resends meanwhile).
        return {"max_ongoing_requests": n, "max_queued_requests": n,
                "health_check_period_s": ROUTER_HEALTH_CHECK_PERIOD_S}

    @property
    def ingress_serve_options(self) -> dict:
        """The ingress's: far above the generation limits, so its gate answers 429 first."""
        n = self.limits.max_http_requests
        return {"max_ongoing_requests": n, "max_queued_requests": n}


def parse_app_args(raw: dict | None) -> AppArgs:
    """Validate the YAML `args:` mapping; the error names the offending field."""
    try:
        return msgspec.convert(raw or {}, AppArgs)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid app args: {e}") from None

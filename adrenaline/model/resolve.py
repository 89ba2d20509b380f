"""Which HF-format directory a model name stands for (every role and the ingress ask here)."""

from __future__ import annotations

from pathlib import Path

from adrenaline.config import ConfigError
from adrenaline.model.builtin import BUILTINS, builtin_path
from adrenaline.model.gguf_checkpoint import converted_dir
from adrenaline.model.packaged import PACKAGED, packaged_path


def resolve_model_dir(model: str) -> Path:
    """The HF-format directory of ``model``.

    ``model`` is a built-in name (generated: "tiny", "small"; packaged:
    "smollm2-135m-instruct"), a local HF-format directory, or a local .gguf
    file (converted once into the cache).
    """
    if model in BUILTINS:
        return builtin_path(model)
    if model in PACKAGED:
        return packaged_path(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_dir(path)
    if not path.is_dir():
        raise ConfigError(f"model: {model!r} is neither a built-in model "
                          f"({', '.join([*BUILTINS, *PACKAGED])}), a local directory nor a "
                          ".gguf file")
    return path

"""The package's layers: nothing below the app imports the app.

The lower layers (actors, engine, model, kernels, transport, policy) never import
``adrenaline.serve`` or ``adrenaline.bench``, at module level or inside a function.
Imports are read with ``ast`` (nothing is executed), relative ones resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "adrenaline"
LOWER = ("actors", "engine", "model", "kernels", "transport", "policy")
UPPER = ("adrenaline.serve", "adrenaline.bench", "adrenaline.sim")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, however deeply nested.

    ``from X import Y`` yields both X and X.Y (Y may be a submodule).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _is_upper(module: str) -> bool:
    return any(module == u or module.startswith(u + ".") for u in UPPER)


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_do_not_import_serve_or_bench(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"adrenaline/{layer} has no modules"
    bad = [f"{f.relative_to(ROOT)}:{line}: {mod}" for f in files
           for line, mod in imported_modules(f) if _is_upper(mod)]
    assert not bad, "lower layer imports an upper one:\n" + "\n".join(bad)


def test_the_import_reader_sees_nested_and_relative_imports(tmp_path):
    """The check above could pass by reading nothing: show it finds each form."""
    pkg = tmp_path / "adrenaline" / "engine"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("import os\n"
                 "def g():\n    from adrenaline.serve.router import Router\n"
                 "class C:\n    def m(self):\n        import adrenaline.bench.report\n"
                 "from ..serve import app\n")
    found = [m for _, m in imported_modules(f, root=tmp_path) if _is_upper(m)]
    assert "adrenaline.serve.router" in found
    assert "adrenaline.bench.report" in found
    assert "adrenaline.serve.app" in found and "adrenaline.serve" in found

"""docs/ARCHITECTURE.md names modules by their path from the repository root
(``adrenaline/serve/router.py``); every one of them must exist, so renaming or removing a
module without updating the page fails here. Dotted import paths it names
(``adrenaline.serve.app:build_app``) must resolve too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
TOP = ("adrenaline", "tests", "scripts", "serve_configs", "loadtests", "docs")

# A path from the repository root: one of TOP, a slash, then path characters.
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(TOP))
# A dotted module path, optionally with ":attribute".
DOTTED = re.compile(r"(?<![\w./-])(adrenaline(?:\.\w+)+(?::\w+)?)")
# Anything that looks like a file path: a word, a slash, ..., ending in a known suffix.
FILEISH = re.compile(r"(?<![\w./-])([\w.-]+/[\w./-]*\.(?:py|md|yaml|sh|json))\b")


def named_paths(text: str) -> set[str]:
    return {m.rstrip(".,") for m in PATH.findall(text)}


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_resolves(name: str, root: Path = ROOT) -> bool:
    """``a.b.c`` (or ``a.b:c``) is a module, or a module's top-level name."""
    module, _, attr = name.partition(":")
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:cut])
        file = base.with_suffix(".py") if not base.is_dir() else base / "__init__.py"
        if not file.exists():
            continue
        rest = parts[cut:] + ([attr] if attr else [])
        if not rest:
            return True
        return len(rest) == 1 and rest[0] in _top_level_names(file)
    return False


def test_every_module_path_named_exists():
    text = DOC.read_text()
    paths = named_paths(text)
    assert len(paths) > 40, "the page names few modules: did the path convention change?"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_dotted_module_named_resolves():
    names = set(DOTTED.findall(DOC.read_text()))
    assert names, "the page names no dotted import path"
    bad = sorted(n for n in names if not dotted_resolves(n))
    assert not bad, f"docs/ARCHITECTURE.md names modules that do not resolve: {bad}"


def test_file_paths_are_written_from_the_repository_root():
    """A path like ``serve/router.py`` would escape the check above: not allowed."""
    text = DOC.read_text()
    short = sorted({p for p in FILEISH.findall(text)
                    if p.split("/")[0] not in TOP and not p.startswith(("http", "www"))})
    # Markdown links to sibling pages in docs/ ("RELIABILITY.md") have no slash: not matched.
    assert not short, f"write these from the repository root: {short}"


def test_the_checks_catch_a_renamed_module(tmp_path):
    assert named_paths("see `adrenaline/serve/router.py`, and adrenaline/engine/.") == {
        "adrenaline/serve/router.py", "adrenaline/engine/"}
    assert not (ROOT / "adrenaline/serve/no_such_router.py").exists()
    assert dotted_resolves("adrenaline.serve.app:build_app")
    assert not dotted_resolves("adrenaline.serve.app:no_such_function")
    assert not dotted_resolves("adrenaline.serve.no_such_module")
    assert FILEISH.findall("in `serve/router.py`") == ["serve/router.py"]

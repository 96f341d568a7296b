"""The package imports downward only: config, sharding and data at the bottom, then models, then io and
engine, then sim (train and eval beside it), then launchers and benchmarks. Imports inside functions count
too, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Package -> the mfjax packages it may import (its own modules always).
ALLOWED = {
    "config": set(),
    "sharding": set(),
    "data": set(),
    "assets": {"data"},
    "models": {"config", "sharding"},
    "io": {"config", "sharding", "models"},
    "engine": {"config", "sharding", "models"},
    "sim": {"config", "sharding", "data", "models", "engine"},
    "eval": {"data", "sim"},
    "train": {"config", "sharding", "data", "models", "io", "engine", "sim"},
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mfjax":
        return None
    return parts[1] if len(parts) > 1 else "mfjax"


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfjax"):
            names = [f"mfjax.{a.name}" for a in node.names] if node.module == "mfjax" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mfjax")]
        else:
            continue
        for name in names:
            yield node.lineno, name


def test_imports_point_downward():
    upward = []
    for path in sorted((ROOT / "mfjax").rglob("*.py")):
        rel = path.relative_to(ROOT)
        pkg = rel.parts[1].removesuffix(".py") if len(rel.parts) > 1 else None
        if pkg in (None, "__init__"):
            continue
        assert pkg in ALLOWED, f"{rel}: package {pkg!r} has no place in the layering table"
        for line, name in _imports(path):
            target = _package(name)
            if target in (pkg, None, "mfjax"):
                continue
            if target not in ALLOWED[pkg]:
                upward.append(f"{rel}:{line} imports {name} ({pkg} -> {target})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_table_is_a_hierarchy():
    """No two packages may import each other, directly or through others."""
    def reach(pkg, seen=()):
        for dep in ALLOWED[pkg]:
            if dep in seen:
                continue
            yield dep
            yield from reach(dep, seen + (dep,))

    for pkg in ALLOWED:
        assert pkg not in set(reach(pkg)), pkg


def test_jitted_code_has_no_layout_checks():
    """One weights layout per entry point: no 'is it a list of layers' tests left in the library."""
    offenders = []
    for path in sorted((ROOT / "mfjax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                kinds = ast.unparse(node.args[1])
                if "list" in kinds and "layers" in ast.unparse(node.args[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders

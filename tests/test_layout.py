"""The package's shape: no import cycles, and no private name of redis-py (or any driver)."""

from __future__ import annotations

import ast
from pathlib import Path

import celery_singleton_lock

PACKAGE = Path(celery_singleton_lock.__file__).parent
NAME = "celery_singleton_lock"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text("utf-8"))
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _top_level_imports(module: str, tree: ast.Module, is_package: bool,
                       known: set[str]) -> set[str]:
    """Modules of this package imported when ``module`` is imported (not inside functions,
    not under ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) \
                else []:
            if isinstance(sub, ast.ImportFrom):
                target = _resolve(module, is_package, sub)
                if target.startswith(NAME):
                    for alias in sub.names:  # a submodule by name, or a name of target
                        sub_module = f"{target}.{alias.name}"
                        found.add(sub_module if sub_module in known else target)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith(NAME))
    return found


def test_no_module_level_import_cycles() -> None:
    modules = _modules()
    packages = {m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py")
                .exists()}
    known = set(modules)
    graph = {m: {t for t in _top_level_imports(m, tree, m in packages, known)
                 if t in modules and t != m}
             for m, tree in modules.items()}
    # Only explicit imports count: a package importing its own submodules in __init__ (to
    # export their names) while they are imported through it is how packages work.
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)


def test_no_private_name_of_a_library_is_imported() -> None:
    offenders = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                parts = node.module.split(".")
                if not parts[0].startswith(NAME) and node.module != "__future__" and (
                        any(p.startswith("_") for p in parts)
                        or any(a.name.startswith("_") for a in node.names)):
                    offenders.append(f"{module}: from {node.module} import "
                                     f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                offenders += [f"{module}: import {a.name}" for a in node.names
                              if any(p.startswith("_") for p in a.name.split(".")[1:])]
    assert not offenders, offenders


def test_no_private_attribute_of_redis_py_is_read() -> None:
    """``conn._sock``, ``pool._available_connections``...: what breaks on a redis-py upgrade."""
    redis_names = {"conn", "connection", "pool", "client", "pubsub", "cluster", "pipe"}
    offenders = []
    for module, tree in _modules().items():
        if not module.startswith(f"{NAME}.backends.redis"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                base = node.value
                name = base.attr if isinstance(base, ast.Attribute) else \
                    base.id if isinstance(base, ast.Name) else ""
                if name in redis_names:
                    offenders.append(f"{module}: {name}.{node.attr}")
    assert not offenders, offenders

"""The package's shape: each module imports only earlier stages, and docs/architecture.md names every
module as it is."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ramserve"

# The pipeline's order: a module may import only the modules before it (imports inside functions
# included). Foundations first, the command last.
ORDER = [
    "errors", "fmt", "progress", "settings", "atomic", "records", "process", "device", "seams", "relay",
    "cache", "affine", "compensate", "source",
    "sensitivity", "fisher", "rounding", "profile",
    "allocate", "budget", "shape", "plan", "hosts", "describe",
    "quantize",
    "cpu", "constrain", "output", "kvcache", "crew", "engine", "pipeline",
    "fit", "evaluate",
    "server.errors", "server.limits", "server.metrics", "server.registry", "server.core",
    "server.schemas", "server.openai_api", "server.anthropic_api", "server.ollama_api",
    "server.web", "server.app", "server",
    "variants", "cluster", "service", "status",
    "cli",
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found.pop("")  # the package's own __init__: its docstring only
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every ramserve module ``name`` imports, at any depth of its code."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None:  # from . import cache
                out.update(".".join([*target, a.name]) for a in node.names)
            else:
                out.add(".".join(target))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ramserve"):
            out.add(node.module.removeprefix("ramserve").lstrip("."))  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("ramserve.") for a in node.names
                       if a.name.startswith("ramserve."))  # fmt: skip
    return {m for m in out if m} - {name}


def test_every_module_has_a_place_in_the_order() -> None:
    assert sorted(modules()) == sorted(ORDER)


def test_each_module_imports_only_earlier_stages() -> None:
    rank = {m: i for i, m in enumerate(ORDER)}
    backwards = []
    for name, path in modules().items():
        for target in sorted(imports_of(name, path)):
            assert target in rank, f"{name} imports {target}, which is not a ramserve module"
            if rank[target] > rank[name]:
                backwards.append(f"{name} -> {target}")
    assert not backwards, "imports of later stages: " + ", ".join(backwards)


def test_the_order_test_sees_imports_inside_functions() -> None:
    # budget imported the engine inside a function before the device module existed.
    found = imports_of("budget", PACKAGE / "budget.py")
    assert "device" in found and "engine" not in found
    nested = imports_of("fisher", PACKAGE / "fisher.py")
    assert "device" in nested  # imported inside a function there


def test_the_architecture_document_names_every_module() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [m for m in modules() if f"`{m.replace('.', '/')}`" not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"

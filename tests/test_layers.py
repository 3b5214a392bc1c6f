"""The package's import graph: no cycles, and every import points down the layers of
docs/architecture.md. Imports under ``TYPE_CHECKING`` and inside functions count too: a cycle
that only the type checker sees is still two modules that cannot be read apart."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "pilot_agents"

# Lower runs first; a module may import modules of a lower layer, or of its own layer when both
# sit in the same package. The longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "pilot_agents.errors": 0,
    "pilot_agents.version": 0,
    "pilot_agents.addressing": 1,
    "pilot_agents.transport": 1,
    "pilot_agents.runtime": 1,
    "pilot_agents.home": 1,
    "pilot_agents.terminal": 1,
    "pilot_agents.net._native": 1,
    "pilot_agents.net.tunnel": 2,
    "pilot_agents.net.traversal": 3,
    "pilot_agents.net.io": 4,
    "pilot_agents.net": 4,  # the package itself: checks the compiled build is current
    "pilot_agents.identity": 5,
    "pilot_agents.trust": 6,
    "pilot_agents.ipc": 6,
    "pilot_agents.datasocket": 7,
    "pilot_agents.node": 6,
    "pilot_agents.beacon": 6,
    "pilot_agents.sdk": 8,
    "pilot_agents.patterns": 9,
    "pilot_agents.daemon": 10,  # hosts patterns for the CLI's one-shot verbs (a daemon's publisher)
    "pilot_agents.integrations": 10,
    "pilot_agents.pipeline": 11,
    "pilot_agents.cli": 12,
    "pilot_agents": 13,  # the package's own __init__: re-exports the public names
}

# What the layers built on the interface may import, whatever their layer number.
ON_THE_INTERFACE = ("pilot_agents.patterns", "pilot_agents.integrations", "pilot_agents.pipeline")
# runtime: the public pilot_agents.run and the signal handling an agent and a command share;
# addressing: the one parser of what users type as addresses (a pipeline file's beacon).
INTERFACE = ("pilot_agents.transport", "pilot_agents.errors", "pilot_agents.sdk",
             "pilot_agents.runtime", "pilot_agents.addressing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import module` depends on the module; `from module import name` on it.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> tuple[int, str]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix], prefix


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in graph().items():
        if module.startswith(ON_THE_INTERFACE):
            wrong += [f"{module} -> {t} (may import only {', '.join(INTERFACE)})"
                      for t in targets if not t.startswith(INTERFACE + ON_THE_INTERFACE)]
        rank, prefix = layer(module)
        for target in targets:
            target_rank, target_prefix = layer(target)
            if target_rank > rank or (target_rank == rank and target_prefix != prefix):
                wrong.append(f"{module} (layer {rank}) -> {target} (layer {target_rank})")
    assert wrong == [], "\n".join(sorted(wrong))


def test_every_module_has_a_layer() -> None:
    """A new top-level module or package gets its place in LAYERS (and the architecture
    doc), rather than falling into the package's own layer."""
    homeless = [m for m in all_modules()
                if layer(m)[1] == "pilot_agents" and m != "pilot_agents"]
    assert homeless == []

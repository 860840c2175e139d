"""The layout shows the architecture: which package may import which, and no import cycles.

    api/     HTTP            → core (and model.tokenizer, which is torch-free)
    client/  REST from Python → core's contract
    worker/  the runtime     → core, model
    core/    the shared core: the job contract, stores, queues, storage, settings
    model/   the network and its generation; model/weights/, the weight files beside it

Imports are read from the source with ast, every one of them: at the top, inside functions
(lazy imports count: they are real dependencies) but not under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "cli", "client", "core", "model", "worker")

# What each package may import from the others (itself always).
ALLOWED = {
    "model": set(),
    "core": set(),
    "worker": {"core", "model"},
    "api": {"core", "model.tokenizer"},
    "client": {"core"},
    "cli": {"api", "client", "core", "model", "worker"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (a name imported from a package counts as its
    submodule when there is one)."""
    tree = ast.parse(path.read_text(encoding="utf8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    paths = {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


GRAPH = _graph()


def test_the_packages_are_where_the_layout_says() -> None:
    for name in ("core.contract", "core.job", "core.store", "core.queue", "core.storage"):
        assert name in GRAPH, name
    for name in ("model.weights.convert", "model.weights.manifest", "model.weights.download"):
        assert name in GRAPH, name
    assert not any(name.startswith("worker.") and "store" in name for name in GRAPH)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_package_imports_a_layer_it_must_not(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    wrong = sorted(
        f"{module} imports {imported}"
        for module, imports in GRAPH.items()
        if module.split(".")[0] == package
        for imported in imports
        if not any(imported == name or imported.startswith(name + ".") for name in allowed)
    )
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(GRAPH.get(module, ())):
            # `import model.weights.files` also runs model/__init__ and model/weights/__init__;
            # a package's __init__ is a module of its own here.
            if state.get(imported) == "open":
                cycles.append([*stack[stack.index(imported) :], imported])
            elif imported in GRAPH and imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, [" → ".join(cycle) for cycle in cycles]


def test_modules_stay_small() -> None:
    # About 400 lines; a bigger module usually holds two concepts.
    long = {
        str(path.relative_to(ROOT)): count
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (count := len(path.read_text(encoding="utf8").splitlines())) > 450
    }
    assert not long, long

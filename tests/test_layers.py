"""The import graph of omni/: layers point down only, and nothing imports in a circle.

Every `import` counts, at module level or inside a function (a function-level import hides a cycle from Python,
not from a reader)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "omni")

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS = (
    ("omni.config", "omni.files"),
    ("omni.data", "omni.parallel"),
    ("omni.models",),
    ("omni.losses", "omni.compress", "omni.generate", "omni.engine", "omni.openai_format", "omni.estimate"),
    ("omni.train", "omni.workdir"),  # the trainer writes a workdir; the workdir reads checkpoints
    ("omni.interop",),
    ("omni.stages",),
    ("omni.aot",),
    ("omni.chat", "omni.pipeline", "omni.sweep", "omni.main", "omni.cli", "omni.serve"),
    ("omni",),  # the package root: omni.load and friends for users, imported by nothing inside
)


def _modules() -> dict[str, str]:
    mods = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = "omni" + path[len(ROOT):-3].replace(os.sep, ".")
                mods[dotted.removesuffix(".__init__")] = path
    return mods


def _imports(module: str, path: str, mods: dict[str, str]) -> set[str]:
    """The omni modules `module` imports (a name imported from a package counts as its submodule if one)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


GRAPH = {m: _imports(m, p, _modules()) for m, p in _modules().items()}


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports from above: {upward}"


def test_no_import_cycles():
    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(GRAPH[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH[m])
        return seen

    cycles = sorted(m for m in GRAPH if m in reaches(m))
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_the_walk_sees_known_imports():
    """The checks above would pass vacuously on an empty graph: the walk must find these edges."""
    assert "omni.models.gpt" in GRAPH["omni.generate"]  # `from omni.models.gpt import ...`
    assert "omni.config" in GRAPH["omni.main"]  # `from omni import config as config_lib`
    assert "omni.stages.registry" in GRAPH["omni.main"]  # `from omni.stages import registry`

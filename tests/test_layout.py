"""The package's shape keeps holding: no import cycles, no string factories, no use of another module's _private
names, short functions, a first-line docstring in every file and a docstring on every public function and class."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "volrestore"
MAX_LINES = 60  # per function, decorators excluded; longer ones need a "# long function: why" comment above them


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imported(name: str, tree: ast.Module):
    """(imported volrestore module, names taken from it) for every import anywhere in a module (lazy ones too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "volrestore":
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "volrestore":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, []) if sub in MODULES else (node.module, [alias.name])
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{name}: relative import (use `from volrestore.x import y`)")


def test_the_package_has_stage_folders_with_the_modules_the_design_names():
    for folder in ("io", "blockwise", "model", "simulate", "evaluation", "cluster"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    for module in ("config", "io.ngff", "io.pyramid", "blockwise.grid", "blockwise.blocks", "blockwise.runner",
                   "blockwise.plan", "model.checkpoint", "model.registry", "model.restorer", "evaluation.metrics"):
        assert f"volrestore.{module}" in MODULES, module


def test_no_import_cycle():
    graph = {name: {m for m, _ in imported(name, tree) if m != name} for name, tree in TREES.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: those count as edges too
    for name, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts))} - {name}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_string_factories_and_no_foreign_private_names():
    problems = []
    for name, tree in TREES.items():
        aliases = {}  # local name -> volrestore module it stands for
        for module, names in imported(name, tree):
            problems += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("volrestore"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__"):
                    problems.append(f"{name}:{node.lineno} imports by string ({called})")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_functions_are_short_or_say_why():
    long = []
    for name, tree in TREES.items():
        lines = MODULES[name].read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                noted = first >= 2 and lines[first - 2].strip().startswith("# long function:")
                if size > MAX_LINES and not noted and name != "volrestore.cli":
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "\n".join(long)


def test_every_file_says_what_it_owns_and_public_functions_have_docstrings():
    missing = []
    for name, tree in TREES.items():
        doc = ast.get_docstring(tree)
        if not doc or not doc.splitlines()[0].strip():
            missing.append(f"{name}: no first-line docstring")
        for node in tree.body:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                    and not ast.get_docstring(node) and name != "volrestore.cli"):
                missing.append(f"{name}.{node.name}: no docstring")
    assert not missing, "\n".join(missing)

# Copyright (c) kd_detr contributors.
"""The package's layering, read from the source (ast): no import goes up a layer, no import
cycle between modules, no kd_detr import inside a function (docs/ARCHITECTURE.md)."""
import ast
import os
import shutil
import tempfile
import unittest
from typing import Dict, List, Set, Tuple

from .common import REPO_ROOT

PACKAGE_ROOT = os.path.join(REPO_ROOT, "projects", "kd_detr")
# Bottom to top. A module may import its own layer and the layers below it.
LAYERS = (
    "utils", "compat", "evaluation", "data", "config", "modeling", "checkpoint", "distill", "ov",
    "export", "engine",
)  # fmt: skip
TOP = "__init__"  # kd_detr/__init__.py imports every layer (registration)


def module_name(path: str, root: str = PACKAGE_ROOT) -> str:
    """kd_detr.a.b for <root>/a/b.py (kd_detr.a for a/__init__.py)."""
    rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(["kd_detr"] + rel)


def package_modules(root: str = PACKAGE_ROOT) -> Dict[str, str]:
    """Module name -> file of every module under ``root`` (projects/kd_detr)."""
    modules = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[module_name(path, root)] = path
    return modules


def layer_of(module: str) -> str:
    parts = module.split(".")
    return TOP if len(parts) == 1 else parts[1]


def resolve(module: str, path: str, node: ast.ImportFrom) -> str:
    """The absolute module named by a relative ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    is_package = path.endswith("__init__.py")
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def kd_detr_imports(module: str, path: str, modules: Dict[str, str]) -> List[Tuple[str, int, bool]]:
    """(imported kd_detr module, line, inside a function) of every import in a file; ``from X
    import name`` counts as importing X.name when that is a module, else X."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "kd_detr":
                        found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                target = resolve(module, path, child)
                if target.split(".")[0] != "kd_detr":
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph(modules: Dict[str, str]) -> Dict[str, Set[str]]:
    """Import edges between kd_detr modules (function-level imports included: they only hide a
    cycle)."""
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in kd_detr_imports(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle (a list of modules, first == last), or [] when there is none."""
    state, stack = {}, []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return []


def layering_violations(modules: Dict[str, str]) -> List[str]:
    """Imports that go up a layer, imports of unknown layers and kd_detr imports inside
    functions, one message each."""
    problems = []
    for name, path in sorted(modules.items()):
        here = layer_of(name)
        for target, line, in_function in kd_detr_imports(name, path, modules):
            where = f"{path}:{line}"
            if in_function:
                problems.append(f"{where}: {target} imported inside a function")
            if here == TOP:
                continue
            there = layer_of(target)
            if there == TOP:
                problems.append(f"{where}: imports the package root {target}")
            elif here not in LAYERS or there not in LAYERS:
                problems.append(f"{where}: {name} -> {target}: layer not in LAYERS")
            elif LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{where}: {here} imports {target} from the higher layer {there}")
    return problems


class TestLayering(unittest.TestCase):
    def test_package_has_no_upward_import_and_no_function_level_import(self):
        self.assertEqual(layering_violations(package_modules()), [])

    def test_no_import_cycle(self):
        self.assertEqual(find_cycle(import_graph(package_modules())), [])

    def test_every_package_is_a_layer(self):
        packages = {layer_of(m) for m in package_modules()} - {TOP}
        self.assertEqual(packages - set(LAYERS), set())


class TestLayeringChecker(unittest.TestCase):
    """The checker itself finds what it must find, on a throwaway package tree."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, rel, text):
        path = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def test_detects_upward_function_level_and_cycle(self):
        self.write("__init__.py", "from . import data, engine\n")
        self.write("data/__init__.py", "from .a import x\n")
        self.write("data/a.py", "from ..engine import y\nx = 1\n")
        self.write("engine/__init__.py", "y = 1\n\ndef f():\n    from ..data import b\n")
        self.write("data/b.py", "from . import c\n")
        self.write("data/c.py", "from . import b\n")
        modules = package_modules(self.tmp)
        problems = "\n".join(layering_violations(modules))
        self.assertIn("data imports kd_detr.engine from the higher layer engine", problems)
        self.assertIn("kd_detr.data.b imported inside a function", problems)
        cycle = find_cycle(import_graph(modules))
        self.assertEqual(cycle[0], cycle[-1])
        self.assertEqual(set(cycle), {"kd_detr.data.b", "kd_detr.data.c"})

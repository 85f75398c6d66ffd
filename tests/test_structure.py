"""The engine's public surface, checked on the source (no TensorFlow import).

Library modules do not use another module's private names, and tests drive
the engine through public names only and never patch an engine object (a
fault injected by patching the OS, e.g. `run_dir.fcntl.flock`, is fine).
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("engine", "models", "benchmarks", "train_main.py")
PROJECT_PACKAGES = ("engine", "models", "train_main")


def _python_files(*places):
    for place in places:
        path = os.path.join(ROOT, place)
        if path.endswith(".py"):
            yield path
            continue
        for folder, _, names in os.walk(path):
            yield from (os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))


def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def _defined_private_names():
    """Every private name the project defines -> the files defining it."""
    where = {}
    for path in _python_files("engine", "models", "train_main.py"):
        for node in ast.walk(_parse(path)):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names = [node.id]
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names = [node.attr]
            for name in names:
                if _private(name):
                    where.setdefault(name, set()).add(path)
    return where


def _defined_methods():
    """Names of methods defined on the project's classes (public ones)."""
    methods = set()
    for path in _python_files("engine", "models"):
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ClassDef):
                methods.update(n.name for n in node.body if isinstance(n, ast.FunctionDef)
                               and not n.name.startswith("_"))
    return methods


def _project_import(node):
    return isinstance(node, ast.ImportFrom) and node.module and \
        node.module.split(".")[0] in PROJECT_PACKAGES


def _imported_project_names(tree):
    """Names a file binds to the project's modules, classes and functions."""
    bound = set()
    for node in ast.walk(tree):
        if _project_import(node):
            bound.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] in PROJECT_PACKAGES)
    return bound


def private_uses(paths, defined, *, own_file_allowed):
    """(file:line, text) of each use of a project private name outside its own module."""
    found = []
    for path in paths:
        tree = _parse(path)
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if _project_import(node):
                found += [(f"{rel}:{node.lineno}", f"from {node.module} import {a.name}")
                          for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) \
                    and node.attr in defined:
                receiver = ast.unparse(node.value)
                if own_file_allowed and (path in defined[node.attr]
                                         or receiver in ("self", "cls")):
                    continue
                found.append((f"{rel}:{node.lineno}", f"{receiver}.{node.attr}"))
    return found


def patches(paths, methods):
    """(file:line, text) of each monkeypatch or assignment that replaces engine code."""
    stdlib = set(sys.stdlib_module_names)
    found = []
    for path in paths:
        tree = _parse(path)
        rel = os.path.relpath(path, ROOT)
        project = _imported_project_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "monkeypatch.setattr":
                target = node.args[0] if node.args else None
                text = ast.unparse(target) if target is not None else ""
                if isinstance(target, ast.Constant):  # "engine.module.name"
                    bad = str(target.value).split(".")[0] in PROJECT_PACKAGES
                else:  # an OS module reached through an engine module is the OS
                    bad = text.split(".")[0] in project and text.split(".")[-1] not in stdlib
                if bad:
                    found.append((f"{rel}:{node.lineno}", f"monkeypatch.setattr({text}, ...)"))
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if not isinstance(target, ast.Attribute):
                        continue
                    text = ast.unparse(target)
                    if text.startswith("self."):  # a test's own class
                        continue
                    if text.split(".")[0] in project or target.attr in methods:
                        found.append((f"{rel}:{node.lineno}", f"{text} = ..."))
    return found


def test_library_modules_use_no_other_modules_private_names():
    defined = _defined_private_names()
    assert private_uses(list(_python_files(*LIBRARY)), defined, own_file_allowed=True) == []


def test_tests_read_no_private_names_of_the_engine():
    tests = [p for p in _python_files("tests") if not p.endswith("test_structure.py")]
    defined = _defined_private_names()
    # A test file's own helpers (_config, _batches, ...) share names with the
    # engine's; only an attribute of an engine object or module counts.
    uses = [(where, text) for where, text in private_uses(tests, defined, own_file_allowed=False)
            if text.startswith("from ") or not _test_defines(where, text.rsplit(".", 1)[1])]
    assert uses == []


def _test_defines(where, name):
    rel = where.split(":")[0]
    return name in {n for n in _private_names_in(os.path.join(ROOT, rel))}


def _private_names_in(path):
    for node in ast.walk(_parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _private(node.name):
            yield node.name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
            yield node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and _private(node.attr) and ast.unparse(node.value) == "self":
            yield node.attr


def test_tests_patch_no_engine_object():
    tests = [p for p in _python_files("tests") if not p.endswith("test_structure.py")]
    assert patches(tests, _defined_methods()) == []

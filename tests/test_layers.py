"""Imports go one way: cli -> commands (verify, bench, serve) -> export -> backends -> leaf utilities, and the
reference model (``model/``, installed as ``nextvit_model``) never imports the toolchain.

The graph is read from the source with ``ast`` and counts every import, including the deferred ones inside
functions (a lazy import is still a dependency, and a lazy cycle is still a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nextvit_deploy": ROOT / "nextvit_deploy", "nextvit_model": ROOT / "model"}

# Modules every layer may use; they import nothing above themselves. backends.base is the runner contract.
LEAVES = {"nextvit_deploy", "errors", "_deps", "artifact", "atomic", "sizes", "manifest", "targets", "data", "preprocess",
          "hub", "parity", "flops", "fuse", "published", "latency", "report", "reference", "trt_compat", "backends",
          "backends.base"}
# One runtime may span modules (the Core ML runner and its Linux evaluator); no runtime imports another.
BACKEND_FAMILIES = {"backends.coreml": "coreml", "backends.coreml_mil": "coreml",
                    "backends.coreml_mil_constexpr": "coreml", "backends.onnxrt": "onnxrt",
                    "backends.tensorrt": "tensorrt", "backends.torch": "torch"}


def _module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    return ".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts))


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]  # `from . import x` names module x


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    files = {_module_name(pkg, p): p for pkg, d in PACKAGES.items() for p in d.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(t for t in _targets(name, path.name == "__init__.py", node) if t in files and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _short(module: str) -> str:
    return module.removeprefix("nextvit_deploy.") if module != "nextvit_deploy" else module


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_lazy_imports(graph):
    # export/__init__ imports fuse and reference only inside functions: the graph must still see them
    assert {"nextvit_deploy.fuse", "nextvit_deploy.reference"} <= graph["nextvit_deploy.export"]
    assert "nextvit_deploy.cli._app" in graph["nextvit_deploy.cli"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_reference_model_never_imports_the_toolchain(graph):
    bad = {m: sorted(d for d in deps if d.startswith("nextvit_deploy")) for m, deps in graph.items()
           if m.startswith("nextvit_model")}
    assert not any(bad.values()), bad


def test_backends_import_no_exporter_command_or_other_runtime(graph):
    bad = []
    for module, deps in graph.items():
        short = _short(module)
        if short not in BACKEND_FAMILIES:
            continue
        for dep in map(_short, deps):
            same_runtime = BACKEND_FAMILIES.get(dep) == BACKEND_FAMILIES[short]
            if dep not in LEAVES and not same_runtime:
                bad.append(f"{short} -> {dep}")
    assert bad == []


def test_leaves_import_only_leaves(graph):
    bad = [f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if _short(m) in LEAVES
           for d in deps if _short(d) not in LEAVES and not d.startswith("nextvit_model")]
    assert bad == []


def test_only_the_cli_imports_the_cli(graph):
    bad = [f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if not _short(m).startswith("cli")
           for d in deps if _short(d).startswith("cli")]
    assert bad == []


def test_exporters_import_no_command(graph):
    commands = ("cli", "bench", "serve", "verify", "evaluate", "eval")
    bad = [f"{_short(m)} -> {_short(d)}" for m, deps in graph.items() if _short(m).startswith("export")
           for d in deps if _short(d).split(".")[0] in commands]
    assert bad == []

"""No import circle among the project's modules, and a cheap ``import smpart``.

The static check reads every ``import`` statement (module level and inside functions: a lazy
import that closes a circle is still a circle a reader has to untangle) of every module under the
four source folders and looks for a cycle; the dynamic check imports every module in a fresh
interpreter in several orders (a circle that only bites in one order shows there).
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> folder, as pyproject.toml maps them
PACKAGES = {"smpart": "smpart", "smpart.triton_kernels": "triton_kernels", "smpart.bench": "bench",
            "smpart.integration": "integration"}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (a ``from pkg import mod`` counts as importing ``pkg.mod``)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # "smpart.region.RegionArgs" -> "smpart.region"
                    t = t.rpartition(".")[0]
                if t and t != name and not (name.startswith(t + ".") and mods[t].name == "__init__.py"):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), else ``None``."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_relative_and_lazy_imports():
    g = import_graph()
    assert "smpart.triton_kernels.dims" in g["smpart.region"]  # from .triton_kernels import dims
    assert "smpart.workspace" in g["smpart.region"]  # inside run_region
    assert "smpart.triton_kernels.fp8" in g["smpart.triton_kernels.indexer_cache"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_kernels_do_not_import_the_runtime():
    graph = import_graph()
    runtime = {m for m in graph if m.startswith("smpart.") and m.count(".") == 1}
    kernels = [name for name in graph if name.startswith("smpart.triton_kernels.")]
    # the loop below must have something to check (a renamed package would make it vacuous)
    assert "smpart.triton_kernels.radix_topk" in kernels and "smpart.region" in runtime, (kernels, sorted(runtime))
    for name in kernels:
        assert not graph[name] & runtime, f"{name} imports the runtime: {sorted(graph[name] & runtime)}"


def _importable(name: str) -> bool:
    needs_vllm = name.startswith("smpart.integration.") and name != "smpart.integration.plugin"
    if needs_vllm:
        try:
            import vllm  # noqa: F401
        except Exception:  # noqa: BLE001
            return False
    return not name.endswith("__main__")


@pytest.mark.parametrize("order", ["sorted", "reversed", "runtime-first", "bench-first"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = [m for m in _modules() if _importable(m)]
    names.sort()
    if order == "reversed":
        names.reverse()
    elif order == "runtime-first":
        names.sort(key=lambda m: (m.count(".") != 1, m))
    elif order == "bench-first":
        names.sort(key=lambda m: (not m.startswith("smpart.bench"), m))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def test_import_smpart_is_cheap():
    code = ("import sys, smpart\n"
            "heavy = sorted(m for m in ('torch', 'triton', 'numpy', 'vllm') if m in sys.modules)\n"
            "print(heavy)\n"
            "from smpart import RegionArgs, RegionWorkspace, run_region, make_decode_batch, PartitionConfig, PATHS\n"
            "print(sorted(PATHS)[0], RegionArgs.__module__, PartitionConfig.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "dual_stream smpart.region smpart.triton_kernels.partitioned"]


def test_unknown_attribute_names_itself():
    import smpart

    with pytest.raises(AttributeError, match="no_such_name"):
        smpart.no_such_name  # noqa: B018

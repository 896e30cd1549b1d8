"""The import rules of DESIGN.md: server -> engine -> model; tokenization/ and server/ stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> set[str]:
    roots = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def test_model_imports_neither_engine_nor_server():
    assert not imported_roots("model") & {"engine", "server"}


def test_tokenization_imports_no_torch_or_upper_layers():
    assert not imported_roots("tokenization") & {"torch", "transformers", "model", "engine", "server"}


def test_tokenization_import_pulls_in_no_torch():
    code = "import sys, tokenization; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_server_app_and_tokenization_load_no_torch():
    """The HTTP face is torch-free: the engine (and torch) is injected by the CLI."""
    code = "import sys, server.app, tokenization; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_scheduler_output_processor_and_grammars_load_no_torch():
    """STYLE.md: the scheduler imports no torch; nor does the per-request bookkeeping around it
    (outputs, grammar matchers and masks): only the runner and the sampler touch tensors."""
    modules = "engine.scheduler, engine.output_processor, engine.structured.llguidance_backend"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


PACKAGES = ("server", "engine", "model", "tokenization")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports: at the top, in functions, under TYPE_CHECKING."""
    paths = {module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` imports the module a.b.c when there is one, else a.b
                targets = [
                    f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in paths
                ]
                targets = targets or [node.module]
            else:
                continue
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["server.app"]  # the graph is really built
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_product_module_over_400_lines():
    sizes = {
        module_name(p): len(p.read_text().splitlines())
        for top in PACKAGES
        for p in (ROOT / top).rglob("*.py")
    }
    assert {m: n for m, n in sizes.items() if n > 400} == {}
    assert sizes["engine.llm_engine"] < 250

"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Used by ``tests/test_layers.py``; also runnable: ``python tests/import_graph.py`` prints every
cycle and every import that points down the layer order the wrong way.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "stepsearch"

# Lower layers first; a module may import its own layer or any layer listed before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("stepsearch", "stepsearch.errors", "stepsearch.java", "stepsearch.arguments",
                     "stepsearch.lightning_adapter", "stepsearch.progress")),
    ("math", ("stepsearch.ppo", "stepsearch.rewards", "stepsearch.evaluation.metrics")),
    ("environment", ("stepsearch.retrieval", "stepsearch.data", "stepsearch.rollout")),
    ("rewards of trajectories", ("stepsearch.rewards.scoring",)),
    ("models", ("stepsearch.models",)),
    ("evaluation loop", ("stepsearch.evaluation",)),
    ("training parts", ("stepsearch.training.iteration", "stepsearch.training.sharding", "stepsearch.training.sft",
                        "stepsearch.training.collectives")),
    ("records", ("stepsearch.records",)),
    ("training", ("stepsearch.training",)),
    ("commands", ("stepsearch.commands",)),
    ("cli", ("stepsearch.cli", "stepsearch.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported stepsearch module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        top = parents.get(node) is tree
        for name in names:
            if name.startswith("stepsearch") and name in modules:
                found.append((name, node.lineno, top))
    return found


def graph(module_level_only: bool = False) -> dict[str, dict[str, int]]:
    files = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    modules = set(files)
    edges: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        for target, line, top in imports(path, modules):
            if target != name and (top or not module_level_only):
                edges.setdefault(name, {}).setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(edges) | {t for targets in edges.values() for t in targets}):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    return best


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    """Imports from a lower layer into a higher one, as 'module:line -> target'."""
    bad = []
    for source, targets in sorted(edges.items()):
        for target, line in sorted(targets.items()):
            if target == "stepsearch" or source.startswith(target + ".") or target.startswith(source + "."):
                continue  # the package itself, a parent package's __init__, or a package exporting its child
            if layer_of(target) > layer_of(source):
                bad.append(f"{source}:{line} -> {target}  ({LAYERS[layer_of(source)][0]} imports {LAYERS[layer_of(target)][0]})")
    return bad


if __name__ == "__main__":
    all_edges = graph()
    for component in cycles(all_edges):
        print("cycle:", " <-> ".join(component))
    for line in upward_imports(all_edges):
        print("upward:", line)

"""The package's shape: no import circles, imports only downwards through the layers, modules small.

Layers (lowest first; ``tests/import_graph.py`` lists them): foundations (errors, java, arguments,
the Lightning adapter) -> math (ppo, rewards, evaluation.metrics) -> environment (retrieval, data,
rollout) -> rewards of trajectories -> models -> the evaluation loop -> training parts (iteration,
sharding, sft) -> records (runs, tracking) -> training (the Lightning module) -> commands -> cli.
Imports inside functions count: a function-level import hides an edge, it does not remove it.
"""

from __future__ import annotations

import import_graph

MAX_MODULE_LINES = 420  # "modules under ~400 lines"


def test_no_import_circles_inside_the_package():
    found = import_graph.cycles(import_graph.graph())
    assert found == [], "import circles (break them by moving the shared part down a layer):\n" + "\n".join(
        " <-> ".join(component) for component in found)


def test_imports_point_down_the_layers():
    assert import_graph.upward_imports(import_graph.graph()) == []


def test_every_module_has_a_layer():
    modules = {import_graph.module_name(p) for p in import_graph.PACKAGE_ROOT.rglob("*.py")}
    assert [m for m in sorted(modules) if import_graph.layer_of(m) < 0] == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    # Guard against a checker that finds nothing: a made-up graph with one of each.
    edges = {"stepsearch.ppo.core": {"stepsearch.training.module": 1},
             "stepsearch.training.module": {"stepsearch.ppo.core": 2}}
    assert import_graph.cycles(edges) == [["stepsearch.ppo.core", "stepsearch.training.module"]]
    assert len(import_graph.upward_imports(edges)) == 1


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(import_graph.PACKAGE_ROOT)): len(p.read_text().splitlines())
             for p in import_graph.PACKAGE_ROOT.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_imports_inside_functions_say_why():
    """Top-level imports, unless an import is heavy or optional: an import of a package module inside
    a function carries a comment saying why (``# lazy: loads torch`` — what it would pull in)."""
    files = {import_graph.module_name(p): p for p in import_graph.PACKAGE_ROOT.rglob("*.py")}
    unexplained = []
    for name, path in sorted(files.items()):
        lines = path.read_text().splitlines()
        for target, line, top in import_graph.imports(path, set(files)):
            if not top and "#" not in lines[line - 1]:
                unexplained.append(f"{path.relative_to(import_graph.PACKAGE_ROOT)}:{line} {lines[line - 1].strip()}")
    assert unexplained == [], "move these to the top of the module, or say why they are lazy:\n" + "\n".join(sorted(set(unexplained)))

"""The package's layout: each folder is one role, imports run one way, and nothing imports in a circle.

Reads the source (no imports run): every `import` and `from ... import` of a dlsearch module,
at the top of a module or inside a function, is an edge of the graph checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dlsearch"

# A role may import its own folder and the roles of a lower rank, never a higher one.
RANK = {
    "errors": 0, "protocol": 0,
    "config": 1,
    "search": 2, "trial": 2, "tracking": 2,
    "backend": 3, "report": 3,
    "tuner": 4,
    "cli": 5, "__init__": 6, "__main__": 6,
}
# The one import against the ranks: the study file's checks ask Optuna whether a sampler's or
# pruner's options are right (search/build.py imports only Optuna and nothing of dlsearch).
ALLOWED_UP = {("config.checks", "search.build")}
# Heavy libraries a command that runs no trial must not import at the top of a module it reaches
# (`validate`, `report`, `best`, `studies`, `ui` start in about a second).
HEAVY = ("torch", "ray", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether at the top level) for every import of `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
            out += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in _imports(path):
            if target.startswith("dlsearch."):
                target = target.removeprefix("dlsearch.")
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _role(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_run_down_the_roles() -> None:
    graph = _graph()
    assert set(map(_role, graph)) <= set(RANK), f"a folder without a rank: {set(map(_role, graph)) - set(RANK)}"
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets
        if _role(a) != _role(b) and RANK[_role(b)] >= RANK[_role(a)] and (a, b) not in ALLOWED_UP
    )
    assert not upward, "imports against the roles' order: " + ", ".join(upward)


def test_a_trial_imports_torch_but_none_of_ray_optuna_mlflow() -> None:
    # One trial runs in a plain shell: dlsearch.trial imports torch and the study's config only.
    bad = sorted(
        f"{name}: {target}" for name, path in _modules().items() if _role(name) == "trial"
        for target, _ in _imports(path) if target.split(".")[0] in ("ray", "optuna", "mlflow")
    )
    assert not bad, bad


def test_each_framework_lives_in_its_role() -> None:
    homes = {"ray": {"backend", "tuner"}, "optuna": {"search", "tuner", "report", "config"},
             "mlflow": {"tracking", "tuner", "report", "cli"}}
    bad = sorted(
        f"{name} imports {target}" for name, path in _modules().items() for target, _ in _imports(path)
        if target.split(".")[0] in homes and _role(name) not in homes[target.split(".")[0]]
    )
    assert not bad, bad


def test_the_commands_that_run_no_trial_import_no_heavy_library_at_the_top() -> None:
    # The modules `validate`, `report`, `best` and `ui` load: a heavy import there is paid on every call.
    graph = _graph()
    start = ["cli.commands", "config.spec", "report.leaderboard", "search.storage", "search.space"]
    seen: set[str] = set()
    todo = list(start)
    modules = _modules()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = [t for t, at_top in _imports(modules[name]) if at_top]
        todo += [t.removeprefix("dlsearch.") for t in top if t.removeprefix("dlsearch.") in graph]
    heavy = sorted(
        f"{name}: {t}" for name in seen for t, at_top in _imports(modules[name])
        if at_top and t.split(".")[0] in HEAVY
    )
    assert not heavy, heavy

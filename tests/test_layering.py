"""The package's shape: no module-level import cycle, and only the plan reads the whole configuration."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "titanlm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _runs_on_import(node: ast.If) -> bool:
    """False for `if TYPE_CHECKING:` and `if __name__ == "__main__":` blocks."""
    test = ast.unparse(node.test)
    return test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING") and "__main__" not in test


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at the top, or in try/if blocks there (not under
    TYPE_CHECKING or __main__, not inside functions or classes)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _runs_on_import(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the titanlm modules that importing it runs at module level (a name imported from a
    package counts as the submodule of that name when there is one, else as the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
                continue
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
        # Importing a.b.c first runs a/b/__init__.py: an edge to each package around the target, except
        # the packages around this module, which are already importing when it runs.
        own = _packages_around(name)
        for target in list(targets):
            targets |= _packages_around(target) - own
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _packages_around(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_module_level_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "titanlm.plan" in graph["titanlm.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_plan_and_the_entry_points_read_the_whole_job_config() -> None:
    """Components get a section of the config or of the plan: a builder that could read any key would one
    day decide something the plan does not know."""
    readers = set()
    for name, path in _modules().items():
        if "JobConfig" in path.read_text() and not name.startswith("titanlm.config"):
            readers.add(name)
    # train and dry_run load the config and hand it to resolve(); nothing else sees it.
    assert readers <= {"titanlm.plan", "titanlm.train", "titanlm.dry_run"}, readers

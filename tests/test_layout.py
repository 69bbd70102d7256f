"""The package's layering, checked on the source (ast), so it holds for every module whether or
not a test imports it: no import circle anywhere in perijax/, and the library never imports a
command. Commands are the packages `perijax.cli`, `perijax.experiments` and `perijax.launchers`
(README.md, "Code map"); everything else under perijax/ is the library."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "perijax"
COMMANDS = ("perijax.cli", "perijax.experiments", "perijax.launchers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The perijax modules `name` imports anywhere in its source: at the top, inside functions
    and under `if TYPE_CHECKING:` alike (a deferred import still ties the two modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from pkg import name`: the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "perijax":
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    for name in graph:  # a package's submodule need not be its own parent's import
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    return graph


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle_and_a_library_module_importing_a_command():
    graph = {"perijax.a": {"perijax.b"}, "perijax.b": {"perijax.c"}, "perijax.c": {"perijax.a"}}
    assert _cycles(graph) == [["perijax.a", "perijax.b", "perijax.c"]]
    assert _cycles({"perijax.a": {"perijax.b"}, "perijax.b": set()}) == []
    assert _is_command("perijax.cli") and _is_command("perijax.experiments.sweep")
    assert not _is_command("perijax.train") and not _is_command("perijax.client")


def test_the_import_graph_is_read_from_every_module():
    graph = _graph()
    assert len(graph) == len(list(PACKAGE.rglob("*.py")))
    assert "perijax.model" in graph["perijax.step"]  # a top-level import
    assert "perijax.tuning.cpu_kernels" in graph["perijax.tuning"]  # an import inside a function
    assert "perijax.cli.common" in graph["perijax.cli.eval"]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_no_library_module_imports_a_command():
    offenders = [
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if not _is_command(name)
        for dep in sorted(deps)
        if _is_command(dep)
    ]
    assert offenders == []


def test_a_moved_module_or_name_fails_with_one_line_naming_the_new_one():
    import subprocess
    import sys

    import pytest

    import perijax
    import perijax.model

    for old, new in perijax.MOVED.items():
        with pytest.raises(ModuleNotFoundError, match=f"^{old} is now {new}$"):
            __import__(old)
        assert new in _modules(), new
        assert old not in _modules(), old
    import perijax.train

    with pytest.raises(
        AttributeError, match="^perijax.model.einsum is now perijax.model.mixed_einsum$"
    ):
        perijax.model.einsum  # noqa: B018
    with pytest.raises(
        AttributeError, match="^perijax.train.evaluate is now perijax.train.eval_metrics$"
    ):
        perijax.train.evaluate  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        perijax.train.nothing  # noqa: B018
    for module in ("perijax.bench", "perijax.data.prepare"):
        run = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and "perijax.cli." in lines[0], run.stderr

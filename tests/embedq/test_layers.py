"""The package's layers, read from the code's own imports: the shared core imports no wing, the
wings import only downwards (producer and worker never each other; engines neither of them), and
no module imports torch, onnxruntime or tensorrt outside engines/ and the benchmark's baselines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WINGS = {"producer": ROOT / "producer", "worker": ROOT / "worker", "engines": ROOT / "engines"}
# The application layer sits above the wings and may import all of them.
# (embedq/incremental/, a package of it, builds on the producer's sources and the worker's output.)
APPLICATION = {"cli", "bench", "verify", "status", "api", "supervisor", "incremental", "__main__"}
CORE = sorted(p for p in (ROOT / "embedq").glob("*.py") if p.stem not in APPLICATION)
ENGINE_LIBRARIES = {"torch", "onnxruntime", "tensorrt", "tensorrt_rtx"}


def imported(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve within the package
            package = path.parent.name if path.parent != ROOT / "embedq" else ""
            names.add(".".join(filter(None, ["embedq", package, node.module or ""])))
    return names


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "embedq" and parts[1] in WINGS else None


def test_the_core_was_found() -> None:
    assert {"protocol", "keys", "job", "model", "tokenization", "config", "errors", "connection",
            "deadletter", "documents", "durable"} <= {p.stem for p in CORE}


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.stem)
def test_the_shared_core_imports_no_wing(path: Path) -> None:
    wings = {m for m in imported(path) if wing_of(m)}
    assert not wings, f"embedq/{path.name} (core) imports {sorted(wings)}"


@pytest.mark.parametrize(("wing", "forbidden"), [
    ("producer", {"worker", "engines"}), ("engines", {"producer", "worker"}), ("worker", {"producer"})])
def test_wings_import_only_downwards(wing: str, forbidden: set[str]) -> None:
    for path in WINGS[wing].rglob("*.py"):
        bad = {m for m in imported(path) if wing_of(m) in forbidden}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_module_outside_engines_imports_an_inference_library() -> None:
    for path in [*CORE, *WINGS["producer"].rglob("*.py"), *WINGS["worker"].rglob("*.py")]:
        bad = {m for m in imported(path) if m.split(".")[0] in ENGINE_LIBRARIES}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_module_is_over_400_lines() -> None:
    packages = [ROOT / "embedq", *WINGS.values()]
    long = {str(p.relative_to(ROOT)): n for d in packages for p in d.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines (split them along their concerns): {long}"


def test_every_package_folder_is_declared_so_a_regular_install_ships_it() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = set(project["tool"]["setuptools"]["packages"])
    mapping = project["tool"]["setuptools"]["package-dir"]
    on_disk = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join([name, *relative]))
    assert on_disk == declared, f"declare in pyproject.toml: {sorted(on_disk - declared)}; " \
                                f"gone: {sorted(declared - on_disk)}"


def _module_files() -> dict[str, Path]:
    """Every module of the installed layout, by its import name."""
    folders = {"embedq": ROOT / "embedq", **{f"embedq.{w}": p for w, p in WINGS.items()}}
    modules: dict[str, Path] = {}
    for name, folder in folders.items():
        for path in folder.rglob("*.py"):
            if name == "embedq" and path.relative_to(folder).parts[0] in WINGS:
                continue
            parts = [*path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The embedq modules a module imports when it is imported (not lazily, not for type checking)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_import_cycles_between_modules() -> None:
    modules = _module_files()
    graph = {name: _top_level_imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ may import its own submodules (a registry's re-exports); that is no cycle.
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep):], dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)

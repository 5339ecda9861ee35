"""The package layout: every module imports on its own, imports form no cycle, no private names cross modules, the
processes that train or label never load matplotlib (only the evaluation job's figures do), the label job's
task-side modules load neither torch nor the table's libraries, and every test file is named after what it covers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "genre_pipeline"
# The modules that Ray Train workers and the label job's tasks and actors import: no plotting library there.
WORKER_MODULES = ("genre_pipeline.train.loop", "genre_pipeline.label.pipeline")
PLOTTING_MODULES = {"genre_pipeline.evaluate.plots", "genre_pipeline.commands.evaluate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


# Packages a module may load only where it needs them: plotting in the evaluation's figures; torch (seconds) and
# the table's libraries (most of one) are imported again by every new worker process of every night.
WATCHED_PACKAGES = ("matplotlib", "torch", "pyiceberg", "sqlalchemy")


@dataclass(frozen=True)
class FreshImport:
    returncode: int
    stderr: str
    loaded: frozenset[str]  # the WATCHED_PACKAGES the import loaded

    @property
    def loads_matplotlib(self) -> bool:
        return "matplotlib" in self.loaded


def import_fresh(module: str) -> FreshImport:
    """Import `module` first thing in a new interpreter: an import cycle fails when one of its modules comes first."""
    code = (f"import json, sys, {module}; "
            f"print(json.dumps([name for name in {WATCHED_PACKAGES!r} if name in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    lines = result.stdout.strip().splitlines()
    loaded = frozenset(json.loads(lines[-1])) if result.returncode == 0 and lines else frozenset()
    return FreshImport(result.returncode, result.stderr[-2000:], loaded)


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, FreshImport]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(MODULES, pool.map(import_fresh, MODULES), strict=True))


def test_every_module_imports_first_in_a_fresh_interpreter(fresh_imports):
    failed = {module: result.stderr for module, result in fresh_imports.items() if result.returncode}
    assert not failed, "\n\n".join(f"{module}:\n{stderr}" for module, stderr in failed.items())


@pytest.mark.parametrize("module", WORKER_MODULES)
def test_worker_modules_do_not_load_matplotlib(fresh_imports, module):
    assert fresh_imports[module].returncode == 0, fresh_imports[module].stderr
    assert not fresh_imports[module].loads_matplotlib


def test_only_the_evaluation_figures_load_matplotlib(fresh_imports):
    assert {module for module, result in fresh_imports.items() if result.loads_matplotlib} == PLOTTING_MODULES


@pytest.mark.parametrize("module", ["genre_pipeline.label.incremental", "genre_pipeline.label.catalog_ids",
                                    "genre_pipeline.data.posters"])
def test_the_label_jobs_ray_data_task_modules_load_neither_torch_nor_the_table(fresh_imports, module):
    assert fresh_imports[module].returncode == 0, fresh_imports[module].stderr
    assert fresh_imports[module].loaded == frozenset()


def test_the_labeller_actor_loads_torch_but_not_the_table(fresh_imports):
    assert fresh_imports["genre_pipeline.label.actor"].loaded == {"torch"}


def test_the_write_tasks_sink_loads_the_table_but_not_torch(fresh_imports):
    assert fresh_imports["genre_pipeline.label.sink"].loaded == {"pyiceberg"}


def module_imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of each `import` / `from ... import` run when the module loads (not those in functions)."""
    found: list[tuple[str, tuple[str, ...]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, ()) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, tuple(alias.name for alias in child.names)))
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def internal_dependencies(path: Path) -> set[str]:
    """The genre_pipeline modules that loading `path` imports (a `from package import module` names the module)."""
    dependencies = set()
    for module, names in module_imports(path):
        if module in MODULES:
            dependencies.add(module)
            dependencies.update(f"{module}.{name}" for name in names if f"{module}.{name}" in MODULES)
    return dependencies


def assert_no_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}  # "visiting" while on the current path, "done" once all it imports is checked

    def visit(node: str, path: list[str]) -> None:
        state[node] = "visiting"
        for dependency in sorted(graph[node]):
            if state.get(dependency) == "visiting":
                cycle = path[path.index(dependency):] + [node, dependency]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dependency not in state:
                visit(dependency, [*path, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_imports_form_no_cycle():
    assert_no_cycle({module: internal_dependencies(path) for module, path in MODULES.items()})


def package_of(module: str) -> str:
    """genre_pipeline.data.posters -> genre_pipeline.data; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def test_packages_depend_on_each_other_one_way():
    """The tree reads as the data flow: data <- model <- train/label <- evaluate, never back."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        package = package_of(module)
        graph.setdefault(package, set()).update(
            package_of(dependency) for dependency in internal_dependencies(path) if package_of(dependency) != package)
    assert_no_cycle(graph)


def test_no_private_name_is_imported_across_modules():
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "jobs").glob("*.py"), *(REPO / "tests").glob("*.py"),
               *(REPO / "benchmarks").glob("*.py")]
    private = sorted(f"{path.relative_to(REPO)}: from {module} import {name}"
                     for path in sources for module, names in module_imports(path)
                     if module.split(".")[0] == "genre_pipeline" for name in names if name.startswith("_"))
    assert not private, "\n".join(private)


# What a test file may be named after besides a module: a folder or file of the repository it checks.
TESTED_PATHS = {"benchmarks": REPO / "benchmarks", "k8s": REPO / "k8s", "dockerfile": REPO / "Dockerfile",
                "layout": PACKAGE}
END_TO_END = "e2e_"  # suites that run whole jobs, named after what they exercise


def covered_name(module: str) -> str:
    """`genre_pipeline.label.incremental` -> `label_incremental`: its tests are tests/test_label_incremental.py."""
    return module.removeprefix("genre_pipeline").strip(".").replace(".", "_")


def test_every_test_file_is_named_after_a_module_or_is_an_end_to_end_suite():
    names = {covered_name(module) for module in MODULES} | set(TESTED_PATHS)
    names |= {f"benchmarks_{path.stem}" for path in (REPO / "benchmarks").glob("*.py")}
    assert all(path.exists() for path in TESTED_PATHS.values())
    stray = [path.name for path in sorted((REPO / "tests").glob("test_*.py"))
             if not path.stem.removeprefix("test_").startswith(END_TO_END)
             and path.stem.removeprefix("test_") not in names]
    assert stray == []

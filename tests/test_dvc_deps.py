"""dvc.yaml's code deps against the import graph: every project file a stage's command runs is a declared dep.

What `dvae COMMAND` runs: cli.py's module-level imports and the imports inside that command's function, then
everything those modules import, at module level or inside functions (`if TYPE_CHECKING:` blocks never run), with
every package `__init__.py` on the way. A model's lazy import, `Lazy("dvae_cli.module:attribute")` in the registry,
counts as an import of that module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "dvae_cli"
LAZY_TARGET = re.compile(rf"({PACKAGE}(?:\.\w+)+):\w+")


def module_file(name: str) -> Path | None:
    base = PROJECT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(nodes: list[ast.stmt], module: str, is_package: bool) -> set[str]:
    """Project modules imported anywhere in `nodes` (functions included, TYPE_CHECKING blocks left out)."""
    found: set[str] = set()
    stack: list[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Lazy":
            found.add(LAZY_TARGET.fullmatch(node.args[0].value).group(1))
        stack.extend(ast.iter_child_nodes(node))
    return {name for name in found if name.split(".")[0] == PACKAGE and module_file(name) is not None}


def with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(roots: set[str], already: set[str]) -> set[Path]:
    """The files of `roots`, of their packages and of everything they import; `already` are read by the caller."""
    seen = set(already)
    todo = [parent for root in roots for parent in with_parents(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        tree = ast.parse(path.read_text())
        for imported in imported_modules(tree.body, name, path.name == "__init__.py"):
            todo.extend(with_parents(imported))
    return {module_file(name) for name in seen}


def command_function(tree: ast.Module, command: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                name = getattr(decorator.func, "id", getattr(decorator.func, "attr", "")) \
                    if isinstance(decorator, ast.Call) else ""
                if name == "command" and decorator.args and decorator.args[0].value == command:
                    return node
    raise AssertionError(f"cli.py has no command {command!r}")


def files_run_by(command: str) -> set[Path]:
    """The project files `dvae COMMAND` imports."""
    cli = f"{PACKAGE}.cli"
    tree = ast.parse(module_file(cli).read_text())
    top_level = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    roots = imported_modules(top_level, cli, False)
    roots |= imported_modules([command_function(tree, command)], cli, False)
    # the helpers cli.py calls for every command import lazily too
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not any(isinstance(d, ast.Call) for d in node.decorator_list):
            roots |= imported_modules([node], cli, False)
    return closure(roots, {cli}) | {module_file(cli)}


def stages() -> list[tuple[str, dict]]:
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    return [(name, stage.get("do", stage)) for name, stage in pipeline.items()]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(PROJECT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize(("name", "stage"), stages(), ids=[name for name, _ in stages()])
def test_every_file_a_stage_runs_is_a_declared_dep(name: str, stage: dict) -> None:
    command = stage["cmd"].split()[1]
    deps = [dep for dep in stage["deps"] if dep.startswith(PACKAGE)]
    missing = sorted(str(path.relative_to(PROJECT)) for path in files_run_by(command) if not covered(path, deps))
    assert missing == [], f"dvc.yaml stage {name} runs {missing} but does not list them as deps"


@pytest.mark.parametrize(("name", "stage"), stages(), ids=[name for name, _ in stages()])
def test_every_declared_code_dep_is_run(name: str, stage: dict) -> None:
    run = files_run_by(stage["cmd"].split()[1])
    for dep in (dep for dep in stage["deps"] if dep.startswith(PACKAGE)):
        assert any(covered(path, [dep]) for path in run), f"dvc.yaml stage {name} lists {dep}, which it never runs"


def test_stages_never_import_each_other() -> None:
    stage_modules = {path.stem for path in (PROJECT / PACKAGE / "stages").glob("*.py") if path.stem != "__init__"}
    for stage in stage_modules:
        others = {f"{PACKAGE}.stages.{other}" for other in stage_modules - {stage}}
        tree = ast.parse(module_file(f"{PACKAGE}.stages.{stage}").read_text())
        assert not imported_modules(tree.body, f"{PACKAGE}.stages.{stage}", False) & others, stage


def test_a_missing_dep_is_caught() -> None:
    """The check itself: the train command runs the train stage module, which the render stage's deps lack."""
    render = dict(stages())["render"]
    run = files_run_by("train")
    assert not all(covered(path, [d for d in render["deps"] if d.startswith(PACKAGE)]) for path in run)

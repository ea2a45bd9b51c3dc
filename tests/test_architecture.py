"""docs/architecture.md's floor plan, kept true: every import in the package goes only to a room the table allows."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "dvae_cli"
ROW = re.compile(r"^\| `(?P<room>[\w_]+)` \|.*\| (?P<allowed>[^|]*) \|$")


def floor_plan(text: str) -> dict[str, set[str]]:
    """Room → the rooms it may import, from the table's rows."""
    rules = {}
    for line in text.splitlines():
        match = ROW.match(line.strip())
        if match:
            rules[match["room"]] = set(re.findall(r"`([\w_]+)`", match["allowed"]))
    return rules


def room_of(module: str) -> str:
    """`dvae_cli.stages.train` → `stages`; `dvae_cli.params` → `params`; the package root → ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path = PROJECT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PROJECT) -> list[tuple[int, str]]:
    """(line, imported dvae_cli module) of every import in the file, wherever it is."""
    module, found = module_name(path, root), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("dvae_cli")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[:len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            if base == "dvae_cli":
                # `from dvae_cli import X`: X is a room (a module) or the root's __version__
                found += [(node.lineno, f"dvae_cli.{alias.name}" if alias.name != "__version__" else "dvae_cli")
                          for alias in node.names]
            elif base.startswith("dvae_cli"):
                found.append((node.lineno, base))
    return found


def violations(rules: dict[str, set[str]], files: list[Path], root: Path = PROJECT) -> list[str]:
    wrong = []
    for path in files:
        room = room_of(module_name(path, root))
        for line, target in imports(path, root):
            other = room_of(target)
            if other and other != room and other not in rules[room]:
                wrong.append(f"{path.relative_to(root)}:{line} ({room}) imports {target} ({other})")
    return wrong


RULES = floor_plan((PROJECT / "docs" / "architecture.md").read_text())
FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_is_in_the_floor_plan():
    rooms = {room_of(module_name(path)) for path in FILES} - {""}
    assert rooms == set(RULES), "docs/architecture.md's table and the package's rooms differ"


def test_every_import_goes_to_an_allowed_room():
    assert violations(RULES, FILES) == []


def test_the_rooms_form_layers():
    """No circle between rooms: repeatedly taking away the rooms that import no remaining room empties the plan."""
    remaining = dict(RULES)
    while remaining:
        ground = {room for room, allowed in remaining.items() if not allowed & set(remaining) - {room}}
        assert ground, f"the rooms {sorted(remaining)} import each other in a circle"
        remaining = {room: allowed for room, allowed in remaining.items() if room not in ground}


def test_the_check_catches_an_arrow_back_up(tmp_path):
    """The check itself: scoring's metrics importing the models' base class, even lazily, breaks the plan."""
    copy = tmp_path / "dvae_cli" / "scoring" / "metrics.py"
    copy.parent.mkdir(parents=True)
    copy.write_text((PACKAGE / "scoring" / "metrics.py").read_text()
                    + "\n\ndef late():\n    from ..models.base import DiscreteVAE\n    return DiscreteVAE\n")
    assert violations(RULES, [copy], root=tmp_path) == [
        f"dvae_cli/scoring/metrics.py:{len(copy.read_text().splitlines()) - 1} (scoring) imports dvae_cli.models.base "
        "(models)"]


@pytest.mark.parametrize("stage", sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"))
def test_every_stage_has_one_shape(stage):
    """`run(params, [family,] paths, ...)` and one paths record."""
    module = importlib.import_module(f"dvae_cli.stages.{stage}")
    assert list(module.run.__annotations__)[0] == "params"
    records = [value for name, value in vars(module).items()
               if name.endswith("Paths") and dataclasses.is_dataclass(value) and value.__module__ == module.__name__]
    assert len(records) == 1, f"stages/{stage}.py has {len(records)} paths records"
    assert list(module.run.__annotations__).index("paths") in (1, 2)

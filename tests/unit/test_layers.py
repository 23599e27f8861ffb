"""The package's dependency direction, enforced over the real import graph.

Layers, lowest first (docs/design.md): base modules at the package root -> structs, jobspec
-> acl -> server, client -> allocrunner -> http, api -> agent -> cli -> ``__main__``. An
import may point down, or stay inside its own package; it never points up, and packages that
share a layer do not import each other (the client reaches the server only through the
RPC-named interface).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nomad_client"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__init__", "durations", "goflags", "logredact", "safefs",
               "state_db", "untrusted_regex"}),
    frozenset({"structs", "jobspec", "rpcwire", "ui"}),
    frozenset({"acl"}),
    frozenset({"server", "client"}),
    frozenset({"allocrunner"}),
    frozenset({"http", "api"}),
    frozenset({"agent"}),
    frozenset({"cli", "uiproxy"}),
    frozenset({"__main__"}),
)
BASE = LAYERS[0]


def layer_of(component: str) -> int:
    for depth, members in enumerate(LAYERS):
        if component in members:
            return depth
    raise LookupError(component)


def component_of(path: Path, root: Path = PACKAGE) -> str:
    """``nomad_client/server/state.py`` -> ``server``; ``nomad_client/durations.py`` ->
    ``durations``."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_components(tree: ast.AST, package_parts: tuple[str, ...]
                        ) -> Iterator[tuple[int, str]]:
    """(line, component) for every import of a nomad_client module in ``tree``;
    ``package_parts`` locate the file's package (for relative imports)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = (node.module or "").split(".")
                if names[0] != "nomad_client":
                    continue
                names = names[1:]
            else:
                keep = len(package_parts) - (node.level - 1)
                if keep < 0:
                    raise ValueError(f"line {node.lineno}: relative import leaves the package")
                names = [*package_parts[:keep], *(node.module or "").split(".")]
                names = [n for n in names if n]
            if names:
                yield node.lineno, names[0]
            else:  # from nomad_client import x
                for alias in node.names:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "nomad_client" and len(names) > 1:
                    yield node.lineno, names[1]


def violations(source_files: list[Path], root: Path = PACKAGE) -> list[str]:
    found = []
    for path in source_files:
        here = component_of(path, root)
        tree = ast.parse(path.read_text(), str(path))
        package_parts = path.relative_to(root).parts[:-1]
        for line, target in imported_components(tree, package_parts):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target == here:
                continue
            try:
                source_layer, target_layer = layer_of(here), layer_of(target)
            except LookupError as err:
                found.append(f"{where}: {err.args[0]!r} has no layer; add it to LAYERS")
                continue
            if target_layer > source_layer:
                found.append(f"{where}: {here} imports {target}, a higher layer")
            elif target_layer == source_layer and here not in BASE:
                found.append(f"{where}: {here} imports {target}, a sibling in its layer")
    return found


def test_every_import_points_down() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    assert violations(files) == []


@pytest.mark.parametrize(("source", "importer", "line"), [
    ("allocrunner/hook.py", "allocrunner", "from nomad_client.http.router import Router"),
    ("client/x.py", "client", "from nomad_client.server.server import Server"),
    ("agent/x.py", "agent", "from nomad_client.cli import goflags"),
    ("durations.py", "durations", "import nomad_client.structs.models"),
    ("server/x.py", "server", "from ..http import router"),
    ("client/drivers/x.py", "client", "from ...agent import config"),
    ("server/x.py", "server", "from nomad_client.nowhere import thing"),
])
def test_the_check_catches_back_edges(tmp_path: Path, source: str, importer: str,
                                      line: str) -> None:
    fake = tmp_path / "nomad_client"
    path = fake / source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")
    assert component_of(path, fake) == importer
    assert len(violations([path], fake)) == 1


def test_downward_and_internal_imports_pass(tmp_path: Path) -> None:
    fake = tmp_path / "nomad_client"
    path = fake / "http" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("from nomad_client.http.router import Router\n"
                    "from nomad_client.server.server import Server\n"
                    "import nomad_client.durations\n"
                    "from nomad_client import logredact\n"
                    "from . import router\n"
                    "from .. import durations\n")
    assert violations([path], fake) == []

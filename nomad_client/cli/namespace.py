"""``namespace`` commands: apply, list, status, delete (Nomad's ``nomad namespace ...``).

``apply`` takes a namespace name (with ``-description``: an existing namespace keeps its
other fields) or a specification file: HCL, read by the one HCL front-end
(``jobspec.plain``), or JSON (``-json`` or a ``.json`` name) in the API's shape; ``-``
reads stdin. HCL keys: ``name``, ``description``, ``quota``, ``meta { k = "v" }`` and
``capabilities { enabled_task_drivers = [...]  disabled_task_drivers = [...]
task_api = "opt_in" }``; a mistake is reported with its file and line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    out,
    print_formatted,
    reporting,
    resolve_item,
    run_with_client,
)
from nomad_client.jobspec import JobspecError
from nomad_client.jobspec.errors import type_name
from nomad_client.jobspec.plain import KeyPath, PlainDocument, parse_plain
from nomad_client.structs.namespaces import task_api_mode_problem

Spec = dict[str, Any]
# HCL key -> the API's field.
_TEXT_KEYS = {"name": "Name", "description": "Description", "quota": "Quota"}
_CAPABILITY_KEYS = {"enabled_task_drivers": "EnabledTaskDrivers",
                    "disabled_task_drivers": "DisabledTaskDrivers", "task_api": "TaskAPI"}
_SPEC_ERROR = "Error parsing namespace specification"


# ---- specification files ---------------------------------------------------------------

class _HclSpec:
    """An HCL namespace specification turned into the API's object, each mistake named
    with its file and line."""

    def __init__(self, document: PlainDocument, source: str) -> None:
        self._lines = document.lines
        self._source = source
        self.spec = self._top(document.data)

    def _error(self, path: KeyPath, message: str) -> CommandError:
        line = self._lines.get(path)
        where = f"{self._source}:{line}" if line is not None else self._source
        return CommandError(f"{_SPEC_ERROR}: {where}: {'.'.join(path)}: {message}")

    def _top(self, data: Mapping[str, Any]) -> Spec:
        spec: Spec = {}
        for key, value in data.items():
            if key in _TEXT_KEYS:
                spec[_TEXT_KEYS[key]] = self._text(value, (key,))
            elif key == "meta":
                spec["Meta"] = {k: self._text(v, (key, k))
                                for k, v in self._block(value, (key,)).items()}
            elif key == "capabilities":
                spec["Capabilities"] = self._capabilities(self._block(value, (key,)))
            else:
                raise self._error((key,), "unknown key")
        return spec

    def _capabilities(self, body: Mapping[str, Any]) -> Spec:
        capabilities: Spec = {}
        for key, value in body.items():
            path = ("capabilities", key)
            if key == "task_api":
                mode = self._text(value, path)
                problem = task_api_mode_problem(mode)
                if problem is not None:
                    raise self._error(path, problem)
                capabilities["TaskAPI"] = mode
            elif key in _CAPABILITY_KEYS:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise self._error(path, f"expected a list of strings, got "
                                            f"{type_name(value)}")
                capabilities[_CAPABILITY_KEYS[key]] = value
            else:
                raise self._error(path, "unknown key")
        return capabilities

    def _block(self, value: Any, path: KeyPath) -> Mapping[str, Any]:
        """A block's body: ``meta { ... }`` (given once) or ``meta = { ... }``."""
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, list):
            raise self._error(path, "given more than once")
        if not isinstance(value, dict):
            raise self._error(path, f"expected a block, got {type_name(value)}")
        return value

    def _text(self, value: Any, path: KeyPath) -> str:
        if not isinstance(value, str):
            raise self._error(path, f"expected a string, got {type_name(value)}")
        return value


def parse_spec(text: str, source: str, *, is_json: bool) -> Spec:
    """The namespace (the API's object) a specification file describes."""
    if is_json:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{_SPEC_ERROR}: {source}:{exc.lineno}: {exc.msg}") from None
        if not isinstance(spec, dict):
            raise CommandError(f"{_SPEC_ERROR}: {source}: expected a JSON object")
        return spec
    try:
        document = parse_plain(text, source)
    except JobspecError as exc:
        raise CommandError(f"{_SPEC_ERROR}: {exc}") from None
    return _HclSpec(document, source).spec


def _read_spec(source: str, is_json: bool) -> Spec | None:
    """The specification ``source`` names (a file, or ``-`` for stdin); None when it is no
    file: then it is a namespace's name."""
    if source == "-":
        return parse_spec(sys.stdin.read(), "<stdin>", is_json=is_json)
    path = Path(source)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f'Error reading namespace specification "{source}": {exc}') \
            from None
    return parse_spec(text, source, is_json=is_json or path.suffix == ".json")


async def _by_name(client: ApiClient, name: str) -> Spec:
    """The namespace ``name`` as stored, or a new one of that name."""
    try:
        current: Spec = await client.namespace(name)
    except ApiError as exc:
        if exc.status != 404:
            raise
        return {"Name": name}
    return current


# ---- commands ------------------------------------------------------------------------------

def apply_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("namespace apply", "namespace apply [options] <name | file | ->",
                      "Create or update a namespace, by name or from a specification file "
                      "(HCL, or JSON with -json or a .json name; - reads stdin).")
    p.add_positionals("input", 1, 1)
    p.add_flag("description", metavar="TEXT", default=None,
               help="the namespace's description (when applying by name)")
    p.add_bool_flag("json", help="the specification is JSON")
    ns = p.parse(argv)
    spec = _read_spec(ns.input[0], ns.json)
    if spec is not None and ns.description is not None:
        print("Flags are ignored when a file is specified!", file=sys.stderr)

    async def body(client: ApiClient) -> int:
        namespace = spec
        if namespace is None:
            with reporting("Error looking up namespace"):
                namespace = await _by_name(client, ns.input[0])
            if ns.description is not None:
                namespace["Description"] = ns.description
        with reporting("Error applying namespace specification"):
            await client.apply_namespace(namespace)
        out(f'Successfully applied namespace "{namespace.get("Name", "")}"!')
        return 0

    return run_with_client(ns, body)


def _namespaces_table(namespaces: list[Spec]) -> str:
    return fmt.table(["Name", "Description"],
                     [[n.get("Name"), n.get("Description")]
                      for n in sorted(namespaces, key=lambda n: str(n.get("Name")))])


def list_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("namespace list", "namespace list [options]",
                      "List the namespaces you may see.")
    p.add_positionals("args", 0, 0)
    p.add_format_flags("namespaces")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error retrieving namespaces"):
            namespaces = await client.namespaces()
        if not print_formatted(ns, namespaces):
            out(_namespaces_table(namespaces) if namespaces else "No namespaces found")
        return 0

    return run_with_client(ns, body)


def _status(namespace: Spec) -> str:
    capabilities = namespace.get("Capabilities") or {}
    lines = fmt.kv([
        ("Name", namespace.get("Name")),
        ("Description", namespace.get("Description")),
        ("Quota", namespace.get("Quota")),
        ("Enabled Drivers", ",".join(capabilities.get("EnabledTaskDrivers") or ()) or "*"),
        ("Disabled Drivers", ",".join(capabilities.get("DisabledTaskDrivers") or ())),
        ("Task API", capabilities.get("TaskAPI") or "<agent default>"),
    ])
    meta = namespace.get("Meta") or {}
    if meta:
        lines += "\n\nMetadata\n" + fmt.kv(sorted(meta.items()))
    return lines


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("namespace status", "namespace status [options] <name>",
                      "Show a namespace (found by its name or a prefix of it).")
    p.add_positionals("name", 1, 1)
    p.add_format_flags("namespace")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        name = ns.name[0]
        with reporting("Error looking up namespace"):
            found = await resolve_item(client.namespaces(prefix=name), name, "namespace",
                                       "namespaces", _namespaces_table, key="Name")
        if not print_formatted(ns, found):
            out(_status(found))
        return 0

    return run_with_client(ns, body)


def delete_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("namespace delete", "namespace delete [options] <name>",
                      "Delete a namespace (refused while it holds live jobs or variables).")
    p.add_positionals("name", 1, 1)
    ns = p.parse(argv)
    name = ns.name[0]

    async def body(client: ApiClient) -> int:
        with reporting("Error deleting namespace"):
            await client.delete_namespace(name)
        out(f'Successfully deleted namespace "{name}"!')
        return 0

    return run_with_client(ns, body)


COMMANDS = {"apply": apply_cmd, "list": list_cmd, "status": status_cmd, "delete": delete_cmd}

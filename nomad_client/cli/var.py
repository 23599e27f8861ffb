"""``var`` commands: get, put, list, purge, lock and init, for Nomad Variables.

Everything goes through the agent API (``/v1/vars``, ``/v1/var/:path``), so the commands work
from inside a task with ``NOMAD_ADDR=$NOMAD_UNIX_ADDR`` and its workload identity.
Output formats: ``json`` (the API's variable, 2-space indented, as Nomad's CLI prints it),
``table``, ``hcl`` (a spec ``var put`` reads back), ``go-template`` (``cli.gotemplate``)
and ``none``; the default is ``table`` on a terminal and ``json`` otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import CommandError, CommandParser, out, reporting, run_with_client
from nomad_client.cli.gotemplate import render as render_template
from nomad_client.durations import DurationError, format_duration, parse_duration_ns
from nomad_client.jobspec import JobspecError
from nomad_client.jobspec.plain import parse_plain

Command = Callable[[Sequence[str]], int]
Variable = dict[str, Any]

DEFAULT_LOCK_TTL = "15s"
DEFAULT_LOCK_DELAY = "15s"
SECOND_NS = 1_000_000_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---- parsing -------------------------------------------------------------------------------

class VarParser(CommandParser):
    """A parser for one ``var`` command: the global ``-namespace`` flag (``*`` only where
    ``wildcard_ok``) and, on request, the ``-out``/``-template`` pair."""

    def __init__(self, name: str, usage: str, description: str, *, low: int, high: int,
                 wildcard_ok: bool = False) -> None:
        super().__init__(f"var {name}", f"var {name} {usage}", description, namespaced=True,
                         wildcard_ok=wildcard_ok)
        self._formats: tuple[str, ...] = ()
        self._on_terminal = "table"
        self.add_positionals("args", low, high)

    def add_output_flags(self, formats: tuple[str, ...], on_terminal: str = "table") -> None:
        self._formats = formats
        self._on_terminal = on_terminal
        self.add_flag("out", metavar="FORMAT", default="",
                      help=f"output format: {', '.join(formats)} "
                           f"(default: {on_terminal} on a terminal, else json)")
        self.add_flag("template", metavar="TEMPLATE", default="",
                      help="Go template for -out go-template (e.g. '{{ .Items.key }}')")

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        ns = super().parse(argv)
        if self._formats:
            ns.out = _output_format(ns.out, ns.template, self._formats, self._on_terminal)
        return ns


def _output_format(given: str, template: str, formats: tuple[str, ...],
                   on_terminal: str) -> str:
    chosen = given or ("go-template" if template else
                       on_terminal if sys.stdout.isatty() else "json")
    if chosen not in formats:
        raise CommandError(f"Invalid -out value {chosen!r}; expected one of: "
                           f"{', '.join(formats)}")
    if chosen == "go-template" and not template:
        raise CommandError("A template must be supplied using '-template' when using "
                           "go-template formatting")
    if template and chosen != "go-template":
        raise CommandError("The -template flag is only valid with -out go-template")
    return chosen


def _duration_flag(name: str, text: str) -> int:
    try:
        value = parse_duration_ns(text)
    except DurationError as exc:
        raise CommandError(f"Invalid -{name} value: {exc}") from None
    if value < 0:
        raise CommandError(f"Invalid -{name} value: must not be negative")
    return value


def _index_flag(name: str, text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CommandError(f"Invalid -{name} value {text!r}: expected a non-negative integer")
    return value


# ---- output --------------------------------------------------------------------------------

def _json_variable(variable: Mapping[str, Any]) -> str:
    keys = ["Namespace", "Path", "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime",
            "Items", "Lock"]
    shaped = {k: variable[k] for k in keys if k in variable and variable[k] is not None}
    return json.dumps(shaped, indent=2)


def _table_variable(variable: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("Namespace", variable.get("Namespace")),
        ("Path", variable.get("Path")),
        ("Create Time", fmt.format_unix_nanos(variable.get("CreateTime"))),
    ]
    if variable.get("ModifyTime") != variable.get("CreateTime"):
        pairs.append(("Modify Time", fmt.format_unix_nanos(variable.get("ModifyTime"))))
    pairs.append(("Check Index", variable.get("ModifyIndex")))
    items = variable.get("Items") or {}
    return f"{fmt.kv(pairs)}\n\nItems\n{fmt.kv(sorted(items.items())) or fmt.EMPTY}"


def _hcl_string(text: str) -> str:
    # JSON string escapes are valid HCL ones; `${` is kept as is, as our HCL reader keeps it.
    return json.dumps(text)


def _hcl_variable(variable: Mapping[str, Any]) -> str:
    lines = [f"namespace = {_hcl_string(str(variable.get('Namespace') or 'default'))}",
             f"path      = {_hcl_string(str(variable.get('Path') or ''))}",
             "", "items = {"]
    for key, value in sorted((variable.get("Items") or {}).items()):
        lines.append(f"  {_hcl_string(key)} = {_hcl_string(value)}")
    lines.append("}")
    return "\n".join(lines)


def _show_variable(variable: Mapping[str, Any], ns: argparse.Namespace) -> None:
    if ns.out == "none":
        return
    if ns.out == "go-template":
        sys.stdout.write(render_template(ns.template, variable))
        sys.stdout.flush()
        return
    render = {"json": _json_variable, "table": _table_variable, "hcl": _hcl_variable}
    out(render[ns.out](variable))


# ---- reading specs and items ---------------------------------------------------------------

class _Stdin:
    """Stdin may be read once per command (``-`` as a spec or as one item's value)."""

    def __init__(self) -> None:
        self.used = False

    def read(self) -> str:
        if self.used:
            raise CommandError("Standard input ('-') can only be used once")
        self.used = True
        return sys.stdin.read()


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(f"Error reading {path!r}: {reason}") from None


def _spec_from_text(text: str, kind: str, source: str) -> Variable:
    """A variable spec (``Namespace``, ``Path``, ``Items`` and any indexes) from JSON or HCL;
    key case is free, as in Nomad's spec files."""
    try:
        if kind == "json":
            raw = json.loads(text)
        else:
            raw = dict(parse_plain(text, source).data)
    except (ValueError, JobspecError) as exc:
        raise CommandError(f"Error parsing variable specification {source}: {exc}") from None
    if not isinstance(raw, dict):
        raise CommandError(f"Error parsing variable specification {source}: "
                           "expected an object")
    spec = {key[:1].upper() + key[1:]: value for key, value in raw.items()}
    items = spec.get("Items")
    if isinstance(items, list) and len(items) == 1:  # an HCL `items { ... }` block
        items = items[0]
    if items is None:
        items = {}
    if not isinstance(items, Mapping) or not all(isinstance(v, str) for v in items.values()):
        raise CommandError(f"Error parsing variable specification {source}: items must be "
                           "an object of strings")
    spec["Items"] = {str(k): v for k, v in items.items()}
    return spec


def _read_spec(argument: str, input_format: str, stdin: _Stdin) -> Variable:
    if argument == "-":
        return _spec_from_text(stdin.read(), input_format, "<stdin>")
    path = argument[1:]
    suffix = Path(path).suffix
    if suffix not in (".json", ".hcl"):
        raise CommandError(f"Unable to determine format of {path}; use a .json or .hcl "
                           "file name")
    return _spec_from_text(_read_file(path), suffix[1:], path)


def _is_spec_argument(argument: str) -> bool:
    return argument == "-" or (argument.startswith("@") and "=" not in argument)


def _apply_assignment(items: dict[str, str], assignment: str, stdin: _Stdin) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise CommandError(f"Invalid item {assignment!r}: expected key=value")
    if value == "":
        items.pop(key, None)  # Nomad's rule: `key=` removes the item
    elif value == "-":
        items[key] = stdin.read()
    elif value.startswith("@"):
        items[key] = _read_file(value[1:])
    else:
        items[key] = value[1:] if value.startswith("\\@") else value


def _warn_template_unfriendly_keys(items: Mapping[str, str]) -> None:
    odd = sorted(key for key in items if not _IDENTIFIER.fullmatch(key))
    if odd:
        print("Warning: these item keys need the index function in templates "
              f"(e.g. {{{{ index .Items \"{odd[0]}\" }}}}): {', '.join(odd)}", file=sys.stderr)


# ---- get -----------------------------------------------------------------------------------

def get_cmd(argv: Sequence[str]) -> int:
    p = VarParser("get", "[options] <path>", "Read a variable.", low=1, high=1)
    p.add_flag("item", metavar="KEY", default="",
               help="print only this item's value (raw, no newline)")
    p.add_output_flags(("json", "table", "hcl", "go-template", "none"))
    ns = p.parse(argv)
    path = ns.args[0]

    async def body(client: ApiClient) -> int:
        try:
            variable = await client.variable_read(path, ns.namespace)
        except ApiError as exc:
            if exc.status == 404:
                raise CommandError("Variable not found") from None
            raise
        if ns.item:
            items = variable.get("Items") or {}
            if ns.item not in items:
                raise CommandError(f'Variable does not contain "{ns.item}" item')
            sys.stdout.write(items[ns.item])
            sys.stdout.flush()
            return 0
        _show_variable(variable, ns)
        return 0

    with reporting("Error retrieving variable"):
        return run_with_client(ns, body)


# ---- put -----------------------------------------------------------------------------------

def _cas_conflict(exc: ApiError, sent: int) -> CommandError:
    try:
        current = json.loads(exc.body)
    except ValueError:
        current = {}
    found = current.get("ModifyIndex", 0) if isinstance(current, Mapping) else 0
    when = fmt.format_unix_nanos(current.get("ModifyTime")) if found else ""
    lines = ["Check-and-Set conflict", "",
             f"    Your provided check-index ({sent}) does not match the server-side index "
             f"({found}).",
             (f"    The variable was last updated at {when}." if when
              else "    The variable does not exist."),
             "",
             f"    Add -force to overwrite it, or -check-index={found} to write over the "
             "version shown above."]
    return CommandError("\n".join(lines))


def _put_target(ns: argparse.Namespace, stdin: _Stdin) -> tuple[Variable, list[str]]:
    """The spec to write (path, namespace, items, ModifyIndex) and the k=v arguments left."""
    args = list(ns.args)
    spec: Variable = {"Items": {}}
    path = ""
    if not _is_spec_argument(args[0]):
        path = args.pop(0)
    if args and _is_spec_argument(args[0]):
        spec = _read_spec(args.pop(0), ns.input_format, stdin)
    spec_path = str(spec.get("Path") or "")
    spec_namespace = spec.get("Namespace")
    chosen_path = path or spec_path
    if not chosen_path:
        raise CommandError("A variable path is required, either as an argument or in the "
                           "specification")
    chosen_namespace = ns.namespace or spec_namespace or None
    if (path and spec_path and path.strip("/") != spec_path.strip("/")) or (
            ns.namespace and spec_namespace and ns.namespace != spec_namespace):
        spec["ModifyIndex"] = 0  # written somewhere else: the spec's version says nothing
    spec.update(Path=chosen_path, Namespace=chosen_namespace)
    return spec, args


def put_cmd(argv: Sequence[str]) -> int:
    p = VarParser("put", "[options] <path> [<@spec>|-] [<key>=<value>]...",
                  "Create or update a variable. Without -force the write is check-and-set "
                  "against the spec's ModifyIndex (0: only if the variable does not exist). "
                  "Item values may be @file (its contents), - (stdin) or \\@literal; key= "
                  "removes an item.", low=1, high=10_000)
    p.add_flag("in", dest="input_format", metavar="FORMAT", default="json",
               choices=("json", "hcl"), help="format of a spec read from stdin: json or hcl")
    p.add_flag("check-index", dest="check_index", metavar="N", default=None,
               help="write only if the variable's ModifyIndex is N (0: only if absent)")
    p.add_flag("cas", dest="check_index", metavar="N", default=None,
               help="alias of -check-index")
    p.add_bool_flag("force", help="write whatever the variable's current index")
    p.add_output_flags(("json", "table", "hcl", "go-template", "none"), on_terminal="none")
    ns = p.parse(argv)
    check_index = _index_flag("check-index", ns.check_index)
    if ns.force and check_index is not None:
        raise CommandError("-force and -check-index cannot be used together")
    stdin = _Stdin()
    spec, assignments = _put_target(ns, stdin)
    items: dict[str, str] = dict(spec["Items"])
    for assignment in assignments:
        _apply_assignment(items, assignment, stdin)
    if not items:
        raise CommandError("A variable needs at least one item (key=value)")
    _warn_template_unfriendly_keys(items)
    cas = None if ns.force else (check_index if check_index is not None
                                 else int(spec.get("ModifyIndex") or 0))

    async def body(client: ApiClient) -> int:
        try:
            written = await client.variable_write(spec["Path"], items, cas=cas,
                                                  namespace=spec["Namespace"])
        except ApiError as exc:
            if exc.status == 409 and cas is not None:
                raise _cas_conflict(exc, cas) from None
            raise
        if ns.out == "none":
            out(f'Created variable "{written.get("Path")}" with modify index '
                f'{written.get("ModifyIndex")}')
        else:
            _show_variable(written, ns)
        return 0

    with reporting("Error creating variable"):
        return run_with_client(ns, body)


# ---- list ----------------------------------------------------------------------------------

def list_cmd(argv: Sequence[str]) -> int:
    p = VarParser("list", "[options] [<prefix>]",
                  "List the variables (their metadata) the caller may see.", low=0, high=1,
                  wildcard_ok=True)
    p.add_flag("prefix", metavar="PREFIX", default="", help="only paths starting with PREFIX")
    p.add_output_flags(("json", "table", "terse", "go-template"))
    ns = p.parse(argv)
    if ns.args and ns.prefix and ns.args[0] != ns.prefix:
        raise CommandError("Give the prefix once: as -prefix or as the argument")
    prefix = ns.args[0] if ns.args else ns.prefix

    async def body(client: ApiClient) -> int:
        entries = await client.variables_list(prefix, ns.namespace)
        entries.sort(key=lambda e: (e.get("Namespace") or "", e.get("Path") or ""))
        if ns.out == "json":
            out(json.dumps(entries, indent=2))
        elif ns.out == "go-template":
            sys.stdout.write(render_template(ns.template, entries))
        elif not entries:
            out("No matching variables found")
        elif ns.out == "terse":
            for entry in entries:
                out(f"{entry.get('Namespace')}  {entry.get('Path')}"
                    if ns.namespace == "*" else str(entry.get("Path")))
        else:
            out(fmt.table(["Namespace", "Path", "Last Updated"],
                          [[e.get("Namespace"), e.get("Path"),
                            fmt.format_unix_nanos(e.get("ModifyTime"))] for e in entries]))
        return 0

    with reporting("Error retrieving vars"):
        return run_with_client(ns, body)


# ---- purge ---------------------------------------------------------------------------------

def purge_cmd(argv: Sequence[str]) -> int:
    p = VarParser("purge", "[options] <path>", "Delete a variable (a missing one is no error).",
                  low=1, high=1)
    p.add_flag("check-index", dest="check_index", metavar="N", default=None,
               help="delete only if the variable's ModifyIndex is N")
    ns = p.parse(argv)
    check_index = _index_flag("check-index", ns.check_index)
    path = ns.args[0]

    async def body(client: ApiClient) -> int:
        try:
            await client.variable_delete(path, cas=check_index, namespace=ns.namespace)
        except ApiError as exc:
            if exc.status == 409 and check_index is not None:
                raise _cas_conflict(exc, check_index) from None
            raise
        out(f'Successfully purged variable "{path}"!')
        return 0

    with reporting("Error purging variable"):
        return run_with_client(ns, body)


# ---- lock ----------------------------------------------------------------------------------

class _LockHolder:
    """Holds one variable lock while a child process runs: acquires (retrying while another
    holder has it), renews at about half the TTL from a task it owns, releases at the end."""

    def __init__(self, client: ApiClient, path: str, namespace: str | None, ttl_ns: int,
                 delay_ns: int, backoff: float) -> None:
        self._client = client
        self._path = path
        self._namespace = namespace
        self._ttl_ns = ttl_ns
        self._delay_ns = delay_ns
        self._backoff = backoff
        self.lock_id = ""

    async def acquire(self) -> None:
        lock = {"TTL": format_duration(self._ttl_ns), "LockDelay": format_duration(self._delay_ns)}
        # Nomad's CLI starts with a short random pause so that contenders started together
        # do not retry in step.
        await asyncio.sleep(random.uniform(0.0, 0.1))
        while True:
            try:
                held = await self._client.variable_lock_acquire(self._path, lock,
                                                                namespace=self._namespace)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                await asyncio.sleep(self._backoff)
                continue
            self.lock_id = str((held.get("Lock") or {}).get("ID") or "")
            if not self.lock_id:
                raise CommandError("Lock error: the agent granted the lock without an ID")
            return

    async def keep_renewed(self) -> None:
        """Renew every half TTL until cancelled; a 409 means the lock is lost: say so and
        stop renewing (as Nomad's CLI, the child is not killed)."""
        interval = self._ttl_ns / SECOND_NS / 2
        while True:
            await asyncio.sleep(interval)
            try:
                await self._client.variable_lock_renew(self._path, self.lock_id,
                                                       self._namespace)
            except ApiError as exc:
                if exc.status in (404, 409):
                    print(f"Lock error: lock lost: {exc}", file=sys.stderr)
                    return
                print(f"Lock warning: renewal failed, retrying: {exc}", file=sys.stderr)

    async def release(self) -> None:
        await self._client.variable_lock_release(self._path, self.lock_id, self._namespace)


async def _run_child(command: Sequence[str], shell: bool) -> int:
    """Run the child with inherited stdio, forwarding SIGINT/SIGTERM; its exit status (128+N
    when killed by signal N, as shells report it)."""
    if shell:
        process = await asyncio.create_subprocess_exec(
            os.environ.get("SHELL") or "/bin/sh", "-c", " ".join(command))
    else:
        process = await asyncio.create_subprocess_exec(*command)
    loop = asyncio.get_running_loop()
    forwarded = (signal.SIGINT, signal.SIGTERM)
    for signum in forwarded:
        loop.add_signal_handler(signum, process.send_signal, signum)
    try:
        code = await process.wait()
    finally:
        for signum in forwarded:
            loop.remove_signal_handler(signum)
    return 128 - code if code < 0 else code


def lock_cmd(argv: Sequence[str]) -> int:
    p = VarParser("lock", "[options] <path> <command> [<args>...]",
                  "Hold the variable's lock while running a command: acquire (waiting while "
                  "another holder has it), renew at about half the TTL, release when the "
                  "command exits. Exits with the command's status.", low=2, high=10_000)
    p.add_flag("ttl", metavar="DURATION", default="", help=f"lock TTL (default {DEFAULT_LOCK_TTL})")
    p.add_flag("delay", metavar="DURATION", default="",
               help=f"lock delay after an expiry (default {DEFAULT_LOCK_DELAY})")
    p.add_flag("backoff", metavar="DURATION", default="",
               help="wait between acquire attempts (default 1.1 x TTL)")
    p.add_bool_flag("shell", default=True,
                    help="run the command with $SHELL -c (default true); false: exec argv")
    ns = p.parse(argv)
    ttl_ns = _duration_flag("ttl", ns.ttl or DEFAULT_LOCK_TTL)
    delay_ns = _duration_flag("delay", ns.delay or DEFAULT_LOCK_DELAY)
    backoff_ns = _duration_flag("backoff", ns.backoff) if ns.backoff else ttl_ns * 11 // 10
    path, command = ns.args[0], ns.args[1:]

    async def body(client: ApiClient) -> int:
        holder = _LockHolder(client, path, ns.namespace, ttl_ns, delay_ns,
                             backoff_ns / SECOND_NS)
        await holder.acquire()
        renewer = asyncio.create_task(holder.keep_renewed())
        try:
            code = await _run_child(command, ns.shell)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await holder.release()
        return code

    with reporting("Lock error"):
        return run_with_client(ns, body)


# ---- init ----------------------------------------------------------------------------------

_EXAMPLE_ITEMS = {"username": "example-user", "password": "change-me"}

_EXAMPLE_HCL = """\
# A Nomad variable specification, for `nomad-client var put @<this file>`.
#
# path: where the variable lives; a path given on the command line wins.
# path = "example/path"
#
# namespace: defaults to $NOMAD_NAMESPACE, then "default"; -namespace wins.
# namespace = "default"

# items: the secret material, encrypted and stored as one unit. Keys made of letters, digits
# and underscores are the easiest to use in templates ({{ .Items.username }}).
items {
  username = "example-user"
  password = "change-me"
}
"""


def init_cmd(argv: Sequence[str]) -> int:
    p = VarParser("init", "[options] [<file>]",
                  "Write an example variable specification (spec.nv.hcl or spec.nv.json).",
                  low=0, high=1, wildcard_ok=True)
    p.add_flag("out", metavar="FORMAT", default="hcl", choices=("hcl", "json"),
               help="hcl or json (default hcl)")
    p.add_bool_flag("quiet", help="print the example to stdout instead of writing a file")
    ns = p.parse(argv)
    text = (_EXAMPLE_HCL if ns.out == "hcl" else
            json.dumps({"Path": "example/path", "Items": _EXAMPLE_ITEMS}, indent=2) + "\n")
    if ns.quiet:
        sys.stdout.write(text)
        return 0
    target = ns.args[0] if ns.args else f"spec.nv.{ns.out}"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
    except FileExistsError:
        raise CommandError(f'File "{target}" already exists') from None
    except OSError as exc:
        raise CommandError(f"Failed to write {target!r}: {(exc.strerror or '').lower()}") \
            from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    out(f"Example variable specification written to {target}")
    return 0


COMMANDS: Mapping[str, Command] = {
    "get": get_cmd,
    "put": put_cmd,
    "list": list_cmd,
    "purge": purge_cmd,
    "lock": lock_cmd,
    "init": init_cmd,
}

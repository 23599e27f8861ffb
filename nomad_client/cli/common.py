"""Plumbing shared by CLI commands: global API flags, running a command against the agent,
turning API failures into one-line errors, and resolving ID prefixes.

Global flags: ``-address``, ``-token``, ``-region`` (default ``$NOMAD_REGION``) and
``-no-color`` (accepted; nothing is coloured) on every API command; ``-namespace`` (default
``$NOMAD_NAMESPACE``; the flag wins) on those that address jobs, allocations or variables,
sent with every request the command makes.

Commands write to stdout/stderr; this module only adds the connection handling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from nomad_client.api import ApiClient, ApiConnectionError, ApiError
from nomad_client.goflags import GoArgumentParser, UsageError

ALL_NAMESPACES = "*"
Command = Callable[[Sequence[str]], int]
WILDCARD_REFUSED = 'The wildcard namespace ("*") is not valid for this command.'


class CommandError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


class CommandParser(GoArgumentParser):
    """The parser of one API command: the global -address/-token flags are already added
    (and ``-namespace`` when ``namespaced``; ``wildcard_ok`` lets it be ``*``), and
    :meth:`parse` checks the count of positional arguments against the command's usage line.

    The parsed result's ``client_namespace`` is what the API client sends by default
    (None: nothing, the agent's ``default``); a namespaced command may change it before it
    runs (``job run`` uses the job's own)."""

    def __init__(self, prog: str, usage: str, description: str, *, namespaced: bool = False,
                 wildcard_ok: bool = False) -> None:
        super().__init__(f"nomad-client {prog}", description=description,
                         usage=f"nomad-client {usage}")
        self._command_usage = usage
        self._positional_range: tuple[str, int, int] | None = None
        self._namespaced = namespaced
        self._wildcard_ok = wildcard_ok
        self.add_flag("address", metavar="ADDR",
                      help="agent address (default: $NOMAD_ADDR or http://127.0.0.1:4646)")
        self.add_flag("token", metavar="TOKEN", help="ACL token (default: $NOMAD_TOKEN)")
        self.add_flag("region", metavar="REGION",
                      help="region to send the request to (default: $NOMAD_REGION)")
        # Accepted for Nomad's scripts; this CLI never prints colour.
        self.add_bool_flag("no-color", help="disable coloured output (there is none)")
        self._format_flags = False
        if namespaced:
            every = '; "*": every namespace you may see' if wildcard_ok else ""
            self.add_flag("namespace", metavar="NS",
                          help=f"namespace (default: $NOMAD_NAMESPACE or default){every}")

    def add_positionals(self, dest: str, low: int, high: int, help: str | None = None) -> None:
        """Collect the positional arguments in ``dest``; :meth:`parse` wants ``low`` to
        ``high`` of them."""
        self.add_argument(dest, nargs="*", help=help)
        self._positional_range = (dest, low, high)

    def add_format_flags(self, what: str) -> None:
        """``-json`` and ``-t <template>`` (mutually exclusive), printed by :func:`formatted`."""
        self._format_flags = True
        self.add_bool_flag("json", help=f"print the {what} as the API's JSON")
        self.add_flag("t", dest="template", metavar="TEMPLATE", default="",
                      help=f"format the {what} with a Go template (see README)")

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        ns = super().parse(argv)
        if self._positional_range is not None:
            dest, low, high = self._positional_range
            if not low <= len(getattr(ns, dest)) <= high:
                want = f"{low}" if low == high else f"{low} to {high}"
                raise CommandError(f"This command takes {want} argument(s): "
                                   f"{self._command_usage}")
        ns.region = ns.region or os.environ.get("NOMAD_REGION") or None
        if self._format_flags and ns.json and ns.template:
            raise CommandError("Both json and template formatting are not allowed")
        ns.client_namespace = None
        if self._namespaced:
            ns.namespace = ns.namespace or os.environ.get("NOMAD_NAMESPACE") or None
            if ns.namespace == ALL_NAMESPACES and not self._wildcard_ok:
                raise CommandError(WILDCARD_REFUSED)
            ns.client_namespace = ns.namespace
        return ns


def command_group(name: str, commands: Mapping[str, Command]) -> Command:
    """A command that hands its arguments to one of ``commands`` by the first word
    (``acl policy apply``, ``scaling policy list``)."""
    names = ", ".join(commands)
    usage = f"Usage: nomad-client {name} <subcommand> [options]\n\nSubcommands: {names}\n"

    def dispatch(argv: Sequence[str]) -> int:
        if argv and argv[0] in ("-h", "-help", "--help"):
            out(usage.rstrip("\n"))
            return 0
        if not argv or argv[0] not in commands:
            problem = f"unknown subcommand {argv[0]!r}" if argv else "expected a subcommand"
            raise UsageError(f"{name}: {problem} ({names})", usage)
        return commands[argv[0]](argv[1:])

    return dispatch


def make_client(ns: argparse.Namespace) -> ApiClient:
    try:
        return ApiClient(ns.address or None, ns.token, namespace=ns.client_namespace,
                         region=ns.region)
    except ValueError as exc:
        raise CommandError(f"Error initializing client: {exc}") from None


def run_with_client(ns: argparse.Namespace,
                    body: Callable[[ApiClient], Awaitable[int]]) -> int:
    """Run ``body(client)`` on a fresh event loop; the client is always closed."""
    client = make_client(ns)

    async def _go() -> int:
        async with client:
            return await body(client)

    return asyncio.run(_go())


@contextmanager
def reporting(what: str) -> Iterator[None]:
    """Turn API and connection failures into ``CommandError("<what>: <reason>")``."""
    try:
        yield
    except (ApiError, ApiConnectionError) as exc:
        raise CommandError(f"{what}: {exc}") from None


def formatted(ns: argparse.Namespace, data: Any) -> str | None:
    """``data`` as ``-json`` (indented by four spaces, as Nomad prints it) or ``-t`` ask,
    or None when neither flag was given."""
    if getattr(ns, "json", False):
        return json.dumps(data, indent=4)
    if getattr(ns, "template", ""):
        # Imported here: gotemplate builds on this module's CommandError.
        from nomad_client.cli.gotemplate import render

        return render(ns.template, data)
    return None


def print_formatted(ns: argparse.Namespace, data: Any) -> bool:
    """Print ``data`` per ``-json``/``-t`` and say whether it did (else the caller's table)."""
    text = formatted(ns, data)
    if text is None:
        return False
    out(text)
    return True


def out(text: str = "") -> None:
    print(text, file=sys.stdout)


def write_bytes(data: bytes) -> None:
    """Raw bytes to stdout (file contents and logs are not necessarily text)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
    else:
        buffer.write(data)
        buffer.flush()


async def resolve_item(list_call: Awaitable[Any], ident: str, kind: str, plural: str,
                       render_many: Callable[[list[dict[str, Any]]], str], key: str = "ID"
                       ) -> dict[str, Any]:
    """The one item of a ``?prefix=`` list call whose ``key`` is ``ident``, else the one
    whose ``key`` starts with it. Listing every namespace, one ID may be found twice: that
    is ambiguous."""
    items = await list_call or []
    matches = [item for item in items if item.get(key) == ident] or items
    if not matches:
        raise CommandError(f'No {kind}(s) with prefix or id "{ident}" found')
    if len(matches) > 1:
        raise CommandError(f"Prefix matched multiple {plural}\n\n{render_many(matches)}")
    item: dict[str, Any] = matches[0]
    return item


async def resolve_prefix(list_call: Awaitable[Any], ident: str, kind: str, plural: str,
                         render_many: Callable[[list[dict[str, Any]]], str]) -> str:
    """Resolve an ID prefix with a ``?prefix=`` list call to exactly one full ID."""
    return str((await resolve_item(list_call, ident, kind, plural, render_many))["ID"])
